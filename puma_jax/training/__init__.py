"""Training: the loop shared by every stage and the stages themselves.

loop.py         train_and_evaluate(config, workdir): mesh, init/restore, steps, checkpoints,
                logging (python -m puma_jax.main)
registry.py     STAGES / get_stage(name) / make(config, workdir)
stage.py        the Stage protocol: what a stage supplies to the loop
mllm.py         PumaModel pretraining and unified tuning (model setup and step)
decoder.py      one scale's diffusion decoder (model setup and step)
vae.py          the VAE the decoders denoise in, where no pretrained one exists (tiny demo)
init.py         abstract_state / restore_or_init: sharded init (also used by memory_plan)
steps.py        TrainState, accumulate (microbatches), apply (guarded optimizer update)
losses.py       the MLLM loss (one formula) and the diffusion loss
optim.py        AdamW groups, schedules, trainable / frozen split
checkpoints.py  the orbax training-checkpoint manager
data.py         host data slicing and global-batch placement
"""
