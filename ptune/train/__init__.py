"""The training wing: the train boundary (job.py: `train(cfg)`), the loop (loop.py), the data plan
(plan.py), checkpoints (checkpoint.py), the resume policy (resume.py), sweeps (sweep.py) and their
reports (report.py). It builds through ptune.build and writes through ptune.rundir; it imports
nothing from the inference wing (ptune.infer)."""
