"""The fitter table: a `psr fit` recipe's `model` name → fitter class (see `psr.fit`)."""

from psr.core.registry import Registry

FITTERS: Registry[type] = Registry("fitter", {
    "toy-identity": "psr.fit.toy_identity:ToyIdentityFitter",
    "toy-localizer": "psr.fit.toy_localizer:ToyLocalizerFitter",
    "toy-vae": "psr.fit.vae:ToyVaeFitter",
})
