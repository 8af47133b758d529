"""Pool.predict batches a request's rows by their adapter's prompt length (a mixed batch is as wide
as its longest prompt, scripts/bench_serving.py): rows of equal length share forwards, answers
stay in input order and equal those of rows sent one at a time."""

import torch

from ptune import mixed
from ptune.cli import compose
from ptune.multi import Adapter, Pool
from ptune.train import build, build_backbone


def test_rows_are_batched_by_prompt_length_and_answered_in_order(data_dir, monkeypatch):
    backbone, adapters = None, {}
    for k, p in enumerate((6, 2)):
        cfg = compose(["model=tiny-llama", "task=sst2", "method=prompt", f"method.num_virtual_tokens={p}"])
        backbone = backbone or build_backbone(cfg)
        _, method, task = build(cfg, backbone)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for t in method.parameters():
                t.copy_(torch.randn(t.shape, generator=gen))
        adapters[f"p{p}"] = Adapter(f"p{p}", method, task)
    pool = Pool(backbone, adapters)
    sentences = ["a fine movie", "dull and long", "wow", "not good at all", "great fun", "bad"]
    rows = [{"adapter": "p6" if i % 2 == 0 else "p2", "sentence": s} for i, s in enumerate(sentences)]
    alone = [pool.predict([r], batch_size=1)[0] for r in rows]

    seen = []  # the adapters of every forward's rows
    real = mixed.mixed_inputs
    monkeypatch.setattr(mixed, "mixed_inputs", lambda methods, ids, mask, adapter_ids: (
        seen.append(sorted(set(adapter_ids.tolist()))) or real(methods, ids, mask, adapter_ids)))
    assert pool.predict(rows, batch_size=3) == alone  # arrival order p6, p2, p6, ...: sorted, 2 forwards
    assert seen == [[1], [0]]  # the p2 rows first, then the p6 rows, never mixed in one forward
