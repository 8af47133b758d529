"""Pool.predict batches a request's rows by their width in a mixed forward (own prompt + own tokens:
ptune.mixed packs each row so, and a forward is as wide as its widest row): forwards are cut from
the rows sorted by width, answers stay in input order and equal those of rows sent one at a time."""

import torch

from ptune.infer import mixed
from ptune.cli import compose
from ptune.infer.pool import Adapter, Pool
from ptune.build import build, build_backbone


def test_rows_are_batched_by_width_and_answered_in_order(data_dir, monkeypatch):
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
    # short rows of the long prompt, long rows of the short one: by width, the adapters mix
    sentences = ["wow", "dull and long, the most boring film ever made", "bad", "a fine movie",
                 "not good at all, really not, not even once", "great fun"]
    rows = [{"adapter": "p6" if i % 2 == 0 else "p2", "sentence": s} for i, s in enumerate(sentences)]
    alone = [pool.predict([r], batch_size=1)[0] for r in rows]

    seen = []  # per forward: its rows' widths and adapters, and the layout's width
    real = mixed.mixed_inputs

    def spy(methods, ids, mask, adapter_ids):
        out = real(methods, ids, mask, adapter_ids)
        widths = [methods[a].num_virtual_tokens + int(n) for a, n in zip(adapter_ids.tolist(), mask.sum(-1).tolist())]
        seen.append((widths, set(adapter_ids.tolist()), out.inputs["inputs_embeds"].shape[1]))
        return out

    monkeypatch.setattr(mixed, "mixed_inputs", spy)
    assert pool.predict(rows, batch_size=3) == alone  # 2 forwards, answers in input order
    widths = sorted(pool.width(e) for e in pool.encode(rows))
    assert [w for w, _, _ in seen] == [widths[:3], widths[3:]]  # the 3 narrowest rows first
    assert all(width == max(w) for w, _, width in seen)  # a forward is as wide as its widest row
    assert any(len(a) == 2 for _, a, _ in seen)  # rows of both adapters share a forward
