"""Overrides that make a train.py run in a test short and quiet."""

FAST = ["validation.every_n_steps=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "data.batch_size=4", "model.optim.warmup_steps=0"]
