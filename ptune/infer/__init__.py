"""The inference wing: a finished run loaded (ptune.build.load_trained) and put to use: evaluate
(evaluate.py), predict (predict.py), several adapters on one backbone (pool.py, batched together
by mixed.py), served over HTTP (serve.py), ensembles (ensemble.py), domain transfer (transfer.py),
PEFT export (export.py). It never imports a private name of the training wing (ptune.train)."""
