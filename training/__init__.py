"""The training library behind train.py: everything the loop calls, so that train.py shows the optimizer step whole.

    flags.py        the command line: flag declarations, the job's defaults, combinations refused before any work
    precision.py    the one place that decides dtypes: autocast and fp16's dynamic loss scaler
    optim.py        AdamW's parameter groups and the learning-rate schedule
    inference.py    no-grad passes over data: batched per-token log-probs, batches moved to the device
    reference.py    the frozen reference model's log-probs: precomputed once and cached on disk, or a live model
    rollouts.py     GRPO's rollouts: prompts -> sampled groups -> rewards -> advantages -> micro-batches
    batches.py      where a step's micro-batches come from: one source per kind (dataset, rollouts, length samples),
                    and FSDP's 0-weight padding
    evaluation.py   held-out evals (NLL, preference accuracy, rollout accuracy, reward-model pair accuracy) and the
                    before/after report
    reward_scoring.py  a frozen reward model scoring (prompt, completion): GRPO's --reward model:DIR, best-of-n
    checkpoint.py   checkpoints and the training state a resume restores, defined and saved in one place
    setup.py        a run's pieces built from the flags: model, data, batch source, evaluator, optimizer
    distributed.py  several processes under torchrun (data parallel, FSDP2)

Dependencies run one way: scripts (train.py, eval.py, sample.py, rejection_sample.py, experiments/, bench/) ->
training -> data, losses, model. Nothing here imports a script; nothing under data/, losses/ or model/ imports this.
"""
