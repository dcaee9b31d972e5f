"""The EMA of the trainable weights (psr.train.optim)."""

import torch

from psr.train.optim import EMA


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_ema_update_is_the_moving_average():
    model = _model()
    ema = EMA(model.named_parameters(), decay=0.75)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, start[name] + 0.25)  # shadow + (1 − 0.75)·(param − shadow)


def test_applied_swaps_the_ema_in_without_copying_and_restores_exactly():
    model = _model()
    ema = EMA(model.named_parameters(), decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.1)
    ema.update()
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged = ema.state_dict()
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    shadow_storage = {n: t.data_ptr() for n, t in ema.shadow.items()}
    x = torch.randn(5, 4)
    with torch.no_grad():
        trained_out = model(x)
    allocated = []
    real_clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        allocated.append(self.numel())
        return real_clone(self, *args, **kwargs)

    torch.Tensor.clone = counting_clone
    try:
        with ema.applied():
            # The model computes with the EMA values, held in the shadow's own storage.
            for name, param in model.named_parameters():
                assert torch.equal(param, averaged[name]) and param.data_ptr() == shadow_storage[name]
            with torch.no_grad():
                ema_out = model(x)
        assert allocated == []  # no clone of any weight
    finally:
        torch.Tensor.clone = real_clone
    assert not torch.equal(ema_out, trained_out)
    for name, param in model.named_parameters():  # the very tensors, bit for bit
        assert param.data_ptr() == storage[name] and torch.equal(param, training[name])
        assert ema.shadow[name].data_ptr() == shadow_storage[name] and torch.equal(ema.shadow[name], averaged[name])
    with torch.no_grad():
        assert torch.equal(model(x), trained_out)


def test_applied_restores_after_an_error_and_keeps_the_ema_through_a_dtype_round_trip():
    model = _model()
    ema = EMA(model.named_parameters(), decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.123456789)
    ema.update()
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged = ema.state_dict()
    try:
        with ema.applied():
            model.to(torch.bfloat16)  # an export in another dtype replaces the parameters' data
            model.to(torch.float32)
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert all(torch.equal(p, training[n]) for n, p in model.named_parameters())
    assert all(torch.equal(ema.shadow[n], averaged[n]) for n in averaged)  # not rounded through bfloat16


def test_applied_copies_only_a_parameter_whose_dtype_differs_from_the_shadow():
    model = _model()
    model[1].half()  # a float16 parameter against the float32 shadow
    ema = EMA(model.named_parameters(), decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update()
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    with ema.applied():
        for name, param in model.named_parameters():
            assert param.dtype == training[name].dtype  # the model keeps its dtypes
            torch.testing.assert_close(param.float(), ema.shadow[name], rtol=1e-3, atol=1e-3)
    for name, param in model.named_parameters():
        assert param.data_ptr() == storage[name] and torch.equal(param, training[name])
