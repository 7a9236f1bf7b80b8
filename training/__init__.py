"""DeCo training: flow matching with the frequency-aware loss and REPA, EMA, resumable
checkpoints, DDP via torchrun, offline datasets, FID/KID evaluation, and the ``deco train`` /
``deco eval`` commands. Depends on ``deco_export`` for the model; nothing depends on it."""
