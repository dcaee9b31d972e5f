"""In-context flow-matching training of the multi-reference FLUX core (`psr pretrain`).

Modules: config (the recipe), data (dataset rows → batches, resumable order), objective
(timesteps, the in-context forward of a group of rows, the loss), optim (AdamW, schedule,
EMA), checkpoint (atomic, exactly resumable), samples (fixed sample grids), export (final
model folders, LoRA files, merging), logs.
"""

from psr.errors import UserError


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss term or gradient norm). The CLI prints one
    line and exits with code 2, like bad input; the last good checkpoint is left intact."""
