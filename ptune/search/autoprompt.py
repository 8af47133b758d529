"""AutoPrompt: Shin, Razeghi, Logan, Wallace & Singh 2020, "AutoPrompt: Eliciting Knowledge from
Language Models with Automatically Generated Prompts" (EMNLP; their code: ucinlp/autoprompt,
create_trigger.py and label_search.py).

A template with N discrete trigger slots, "{sentence} {trigger:3} {mask} ." (ptune.tasks.templates), whose
tokens are chosen from the vocabulary on the few-shot training rows with nothing trained:

0. label_tokens=search: the label words first (label_search.py), with the starting triggers: a
   logistic regression from the mask's state (the vector the LM's output embedding reads there) to
   the classes; every whole-word token w is scored per class by softmax over classes of
   (class weights . output embedding of w); each token goes to its best class, the top label_k
   per class are its words. label_tokens=given keeps the task's verbalizer.
1. The triggers start as search.init_token (AutoPrompt: [MASK]), or as task.triggers.
2. Iteration i (a generator seeded by (search.seed, i)): a random trigger position j; the loss on
   batch_size random training rows, L = mean over rows of -log P(gold label's words at {mask}) --
   AutoPrompt's get_loss, the gold class's VerbalizerHead score (log of the summed probability of
   the class's words; a multi-piece word teacher-forced over its pieces) -- NOT the cross-entropy
   over classes; g = dL/d(input embedding at slot j), summed over the rows and every occurrence;
   the num_cand tokens w with the largest -(g . e_w) over the input embedding matrix (HotFlip's
   first-order estimate of how much swapping w in lowers L), among the allowed tokens.
3. The current triggers and each candidate swap are scored by L on a fresh draw of
   eval_batches x batch_size rows; the best candidate replaces slot j if its L is lower there.
4. The triggers after every iteration are scored zero-shot on the few-shot dev rows; the result
   is the best by dev accuracy (ties: lower dev loss, then the earlier iteration).

How the gradient is read: rows are encoded with placeholder ids V + j at trigger slot j (V = the
rows of the input embedding), which pass through the verbalizer head's row building as any id; a
pre-hook on the (encoder's) input embedding writes the real trigger ids there, and a forward hook
turns its output into a leaf whose .grad is read after backward. So every backbone kind (causal,
masked, seq2seq) is searched through the same head that scores it at training and evaluation.

Where ptune differs from AutoPrompt's code: candidates are kept by L (the paper's §2.2 criterion);
their code compares accuracy when a label map is given. One gradient batch per iteration (theirs
accumulates accumulation-steps batches; set batch_size instead). The current token is not a
candidate of its own slot. words_only keeps letter tokens but, unlike their --filter, keeps
capitalised ones. The label search: zero-initialised weights, full-batch Adam on the few-shot rows
(theirs: 10 epochs of minibatches of the full training set), whole-word tokens only, each token in
one class. Dev ties are broken by dev loss (few-shot dev sets tie often); theirs keeps the first.
"""

from __future__ import annotations

import copy
import logging
import random
import time

import torch
import torch.nn.functional as F

from ptune.build import build_backbone
from ptune.data import collate
from ptune.errors import PtuneError
from ptune.heads.verbalizer import SlotHead, whole_words
from ptune.search.base import elapsed, finish
from ptune.tasks.templates import Template, token_ids

log = logging.getLogger("ptune")


# -- the config --------------------------------------------------------------------------------------
def check(cfg) -> None:
    s = cfg.search
    for key, low in (("iters", 0), ("num_cand", 1), ("batch_size", 1), ("eval_batches", 1), ("seed", 0),
                     ("save_every", 1), ("num_triggers", 1), ("label_k", 1), ("label_steps", 1)):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise PtuneError(f"search.{key}={v!r} is invalid: must be an integer >= {low}")
    if isinstance(s.label_lr, bool) or not isinstance(s.label_lr, (int, float)) or not s.label_lr > 0:
        raise PtuneError(f"search.label_lr={s.label_lr!r} is invalid: must be a number > 0")
    if s.label_tokens not in ("given", "search"):
        raise PtuneError(f"search.label_tokens={s.label_tokens!r} is invalid: given (the task's verbalizer) or search")
    if not isinstance(s.words_only, bool):
        raise PtuneError(f"search.words_only={s.words_only!r} is invalid: write true or false")
    if s.init_token is not None and (not isinstance(s.init_token, str) or not s.init_token):
        raise PtuneError(f"search.init_token={s.init_token!r} must be a token string (e.g. 'Ġthe') or null")
    if "triggers" not in cfg.task:
        raise PtuneError(f"ptune search autoprompt searches the trigger tokens of a classification task's template; "
                         f"task={cfg.task.name} has no task.triggers (use sst2, cb, rte, boolq or custom)")
    if cfg.task.get("few_shot") is None:
        raise PtuneError("ptune search autoprompt searches on the few-shot protocol's rows: set task.few_shot=K "
                         "(e.g. 16) and task.few_shot_seed")
    if cfg.task.get("demonstrations") is not None:
        raise PtuneError("ptune search autoprompt searches triggers for the template alone; drop task.demonstrations")
    given = Template(cfg.task.template) if cfg.task.get("template") else None
    if given is not None and given.n_trigger and s.template is None and cfg.task.get("triggers") is None:
        # the task is built with its triggers (ptune.tasks.classification): the search's start fills them
        cfg.task.triggers = [start_token(cfg)] * given.n_trigger
    if s.template is not None:
        t = Template(s.template, key="search.template")
        if not t.n_trigger:
            raise PtuneError(f"search.template={s.template!r} has no {{trigger}} slots; add some, e.g. "
                             f"'{{sentence}} {{trigger:3}} {{mask}} .'")
        t.require_mask("ptune search autoprompt")
    elif given is not None and not given.n_trigger:
        raise PtuneError(f"task.template={cfg.task.template!r} has no {{trigger}} slots for ptune search autoprompt; "
                         f"write them, e.g. search.template='{{sentence}} {{trigger:3}} {{mask}} .'")
    if cfg.model.kind == "causal":
        t = Template(s.template) if s.template is not None else given
        kinds = [p.kind for p in t.parts] if t is not None and t.has_mask else ["mask"]
        if "trigger" in kinds[kinds.index("mask"):]:
            raise PtuneError(f"{t.key}={t.source!r} puts {{trigger}} slots after {{mask}}, which a causal model "
                             f"(model={cfg.model.name}) never reads; move them before {{mask}}")


def trigger_template(cfg, task) -> str:
    """search.template, else task.template when it has {trigger} slots, else fields + {trigger:N} {mask} ."""
    if cfg.search.template is not None:
        return cfg.search.template
    if cfg.task.get("template") and Template(cfg.task.template).n_trigger:
        return cfg.task.template
    return " ".join("{" + f + "}" for f in task.fields) + f" {{trigger:{cfg.search.num_triggers}}} {{mask}} ."


def init_triggers(cfg, tokenizer, n: int) -> list[str]:
    """The starting trigger tokens: task.triggers when the template is the task's, else n x init_token."""
    if cfg.search.template is None and cfg.task.get("triggers"):
        given = cfg.task.triggers
        return [given] if isinstance(given, str) else list(given)
    return [start_token(cfg, tokenizer)] * n


def start_token(cfg, tokenizer=None) -> str:
    """search.init_token, or the tokenizer's mask token (AutoPrompt's [MASK]), else its token for " the".
    Without a tokenizer (check(), before the Scorer exists) the backbone is loaded to read its own:
    only when the task's template has trigger slots and neither task.triggers nor init_token is given."""
    if cfg.search.init_token is not None:
        return cfg.search.init_token
    if tokenizer is None:
        tokenizer = build_backbone(cfg).tokenizer
    the = tokenizer(" the", add_special_tokens=False).input_ids[:1]
    return tokenizer.mask_token or tokenizer.convert_ids_to_tokens(the)[0]


# -- what the search reads from the backbone -----------------------------------------------------------
def allowed_tokens(tokenizer, n_rows: int, words_only: bool, exclude: set[int]) -> torch.Tensor:
    """(n_rows,) bool: the ids a trigger may take. Never special tokens, ids beyond the tokenizer,
    `exclude` (the label words' pieces), or tokens holding "${" (Hydra would read an interpolation
    in the overrides); with words_only only tokens that decode to letters."""
    ok = torch.zeros(n_rows, dtype=torch.bool)
    n = min(n_rows, len(tokenizer))
    ok[:n] = True
    ok[[i for i in set(tokenizer.all_special_ids) | exclude if i < n_rows]] = False
    names = tokenizer.convert_ids_to_tokens(list(range(n)))
    ok[[i for i, t in enumerate(names) if t is None or "${" in t]] = False
    if words_only:
        text = tokenizer.batch_decode([[i] for i in range(n)])
        ok[[i for i, t in enumerate(text) if not t.strip().isalpha()]] = False
    return ok


def hotflip(grad: torch.Tensor, embeddings: torch.Tensor, allowed: torch.Tensor, k: int) -> list[int]:
    """The k ids w with the largest -(grad . e_w): the swaps that lower the loss most to first order.
    grad (hidden,), embeddings (vocab, hidden), allowed (vocab,) bool."""
    score = -(embeddings.float() @ grad.float().to(embeddings.device))
    score[~allowed.to(score.device)] = -float("inf")
    k = min(k, int(allowed.sum()))
    return torch.topk(score, k).indices.tolist()


class TriggerGradient:
    """dL/d(input embedding) at the trigger slots (module docstring: placeholders and hooks)."""

    def __init__(self, backbone):
        model = backbone.model
        self.emb = (model.get_encoder().get_input_embeddings() if model.config.is_encoder_decoder
                    else model.get_input_embeddings())
        self.n_rows = self.emb.weight.shape[0]  # V: placeholder j is id V + j

    def placeholders(self, n: int) -> list[int]:
        return [self.n_rows + j for j in range(n)]

    def __call__(self, method, head, batch, triggers: list[int]) -> tuple[float, torch.Tensor]:
        """(L, (n_triggers, hidden) gradient) for a batch encoded with placeholders."""
        device = self.emb.weight.device
        ids = torch.tensor(triggers, device=device)
        calls = []  # per call that held placeholders: [where (rows, seq) bool, slot (rows, seq), leaf]

        def fill(module, args):
            tokens = args[0]
            where = tokens >= self.n_rows
            if not where.any():
                return None
            slot = (tokens - self.n_rows).clamp(0, len(triggers) - 1)
            calls.append([where, slot])
            return (torch.where(where, ids[slot], tokens), *args[1:])

        def leaf(module, args, out):
            if calls and len(calls[-1]) == 2:
                calls[-1].append(out.detach().requires_grad_(True))
                return calls[-1][-1]
            return None

        hooks = [self.emb.register_forward_pre_hook(fill), self.emb.register_forward_hook(leaf)]
        try:
            with torch.enable_grad():
                scores = head.scores(method, batch)  # (batch, n_classes) log P(class's words)
                loss = -scores.gather(1, batch["labels"].to(scores.device)[:, None]).mean()
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
        grad = torch.zeros(len(triggers), self.emb.weight.shape[1])
        for where, slot, out in calls:
            grad.index_add_(0, slot[where].cpu(), out.grad[where].float().cpu())
        return float(loss.detach()), grad


class MaskStates(SlotHead):
    """(batch, hidden): the vector the LM's output embedding reads where it predicts {mask}
    (causal: the last state before it; masked: the state at [MASK] after BERT's transform; seq2seq:
    the decoder's first state, T5's rescaling included), caught by a pre-hook on that layer.
    The rows are VocabHead's (a single-token answer), written out here again rather than shared."""

    def states(self, method, batch) -> torch.Tensor:
        ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["mask_pos"]
        rows, softs, decs, where = [], [], [], []
        for r in range(ids.shape[0]):
            row = ids[r][attn[r].bool()].tolist()
            [q] = self._queries(row, [False] * len(row), int(pos[r]), [(0,)]).values()
            rows.append(q[0]), softs.append(q[1]), decs.append(q[2]), where.append(q[3][0][0])
        seen = []
        hook = method.backbone.model.get_output_embeddings().register_forward_pre_hook(
            lambda m, args: seen.append(args[0]))
        try:
            out = self._forward(method, rows, softs, decs)
        finally:
            hook.remove()
        if self.kind != "causal":  # the forward returned logits; its output layer read these
            out = seen[-1][:, method.n_prepended:] if self.kind == "masked" else seen[-1]
        return out[torch.arange(len(rows), device=out.device), torch.tensor(where, device=out.device)].float()


# -- the search ------------------------------------------------------------------------------------------
class Search:
    """The working parts of one search: the task with the trigger template, its head, the rows."""

    def __init__(self, cfg, scorer, task):
        self.s, self.scorer, self.task = cfg.search, scorer, task
        self.tok = scorer.backbone.tokenizer
        self.head = task.slot_head(scorer.backbone)
        scorer.method.attach_head(self.head)
        self.grad = TriggerGradient(scorer.backbone)
        self.embeddings = self.grad.emb.weight.detach()
        label_ids = {i for ws in self.head.words for w in ws for i in w}
        self.allowed = allowed_tokens(self.tok, self.embeddings.shape[0], self.s.words_only, label_ids)
        self.train = scorer.rows("train")

    def examples(self, rows: list[dict], triggers: list[int]):
        t = copy.copy(self.task)
        t.trigger_ids = triggers  # the ids at the {trigger} slots, in place of task.triggers'
        return t.examples(self.tok, rows)

    def scores(self, rows: list[dict], trigger_sets: list[list[int]]) -> torch.Tensor:
        """(len(trigger_sets), len(rows), n_classes) class scores, no gradient. Each set's rows are
        batched by length as ClassificationTask.classify does, so dev accuracies equal ptune train's."""
        out = []
        for triggers in trigger_sets:
            examples = self.examples(rows, triggers)
            order = sorted(range(len(rows)), key=lambda i: len(examples[i].input_ids))
            scores = torch.zeros(len(rows), len(self.task.labels))
            with torch.no_grad():
                for start in range(0, len(order), self.scorer.batch_size):
                    idx = order[start:start + self.scorer.batch_size]
                    batch = collate([examples[i] for i in idx], self.tok.pad_token_id)
                    scores[torch.tensor(idx)] = self.head.scores(self.scorer.method, batch).float().cpu()
            out.append(scores)
        return torch.stack(out)

    def losses(self, rows: list[dict], trigger_sets: list[list[int]]) -> torch.Tensor:
        """(len(trigger_sets),) L: the mean over rows of -log P(gold class's words)."""
        y = torch.tensor([r["label"] for r in rows])
        return -self.scores(rows, trigger_sets)[:, torch.arange(len(rows)), y].mean(1)

    def dev(self, rows: list[dict], triggers: list[int]) -> dict:
        scores = self.scores(rows, [triggers])[0]
        y = torch.tensor([r["label"] for r in rows])
        return {"dev_accuracy": float((scores.argmax(-1) == y).float().mean()),
                "dev_loss": float(-scores[torch.arange(len(rows)), y].mean())}

    def draw(self, iteration: int, n_triggers: int) -> tuple[int, list[dict], list[dict]]:
        """(trigger position, gradient rows, scoring rows) of an iteration: a function of (seed, iteration)."""
        s = self.s
        rng = random.Random(f"autoprompt:{s.seed}:{iteration}")
        j = rng.randrange(n_triggers)
        grad_rows = rng.sample(self.train, min(s.batch_size, len(self.train)))
        return j, grad_rows, rng.sample(self.train, min(s.batch_size * s.eval_batches, len(self.train)))

    def step(self, triggers: list[int], iteration: int) -> tuple[list[int], dict]:
        """One iteration (module docstring, 2-3): the new triggers and what was scored."""
        s = self.s
        j, grad_rows, eval_rows = self.draw(iteration, len(triggers))
        batch = collate(self.examples(grad_rows, self.grad.placeholders(len(triggers))), self.tok.pad_token_id)
        grad_loss, grad = self.grad(self.scorer.method, self.head, batch, triggers)
        allowed = self.allowed.clone()
        allowed[triggers[j]] = False
        cands = hotflip(grad[j], self.embeddings, allowed, s.num_cand)
        sets = [triggers] + [triggers[:j] + [c] + triggers[j + 1:] for c in cands]
        losses = self.losses(eval_rows, sets).tolist()
        best = min(range(1, len(sets)), key=lambda i: losses[i]) if cands else 0
        accepted = bool(cands) and losses[best] < losses[0]
        record = {"iteration": iteration, "position": j, "grad_loss": grad_loss, "batch_loss": losses[0],
                  "best_candidate": self.tok.convert_ids_to_tokens(sets[best][j]) if cands else None,
                  "candidate_loss": losses[best] if cands else None, "n_candidates": len(cands),
                  "accepted": accepted}
        return (sets[best] if accepted else triggers), record


def find_label_words(cfg, scorer, task) -> dict:
    """label_tokens=search (module docstring, 0): {label: [label_k words]} from the training rows."""
    s, tok, backbone = cfg.search, scorer.backbone.tokenizer, scorer.backbone
    rows = scorer.rows("train")
    head, examples = MaskStates(backbone), task.examples(tok, rows)
    with torch.no_grad():
        states = torch.cat([head.states(scorer.method, collate(examples[i:i + scorer.batch_size], tok.pad_token_id))
                            for i in range(0, len(examples), scorer.batch_size)]).cpu()  # (rows, hidden)
    y = torch.tensor([r["label"] for r in rows])
    n_classes = len(task.labels)
    weight = torch.zeros(n_classes, states.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=s.label_lr)
    for _ in range(s.label_steps):
        opt.zero_grad()
        F.cross_entropy(states @ weight.T + bias, y).backward()
        opt.step()
    vocab = whole_words(tok, task.template.mask_space)
    out_emb = backbone.model.get_output_embeddings().weight.detach().float().cpu()
    ids = torch.tensor([t for _, t in vocab])
    prob = F.softmax(weight.detach() @ out_emb[ids].T, dim=0)  # (classes, words): AutoPrompt's softmax over classes
    owner = prob.argmax(0)
    found = {}
    for c, label in enumerate(task.labels):
        mine = (owner == c).nonzero().flatten()
        top = mine[torch.topk(prob[c, mine], min(s.label_k, len(mine))).indices]
        if not len(top):
            raise PtuneError(f"the label search gave class {label!r} no word; lower search.label_k or use "
                             f"search.label_tokens=given")
        found[label] = [vocab[int(i)][0] for i in top]
    return found


def search(cfg, scorer, sdir, started: float) -> dict:
    s = cfg.search
    state = sdir.load_state()
    tok = scorer.backbone.tokenizer
    template = trigger_template(cfg, scorer.task)
    n = Template(template).n_trigger
    init = state.get("init") or init_triggers(cfg, tok, n)
    verbalizer = state.get("verbalizer") or dict(zip(scorer.task.labels, scorer.task.verbalizer))
    if s.label_tokens == "search" and "verbalizer" not in state:
        verbalizer = find_label_words(cfg, scorer, scorer.variant(template=template, triggers=init))
        log.info("autoprompt label words: %s", verbalizer)
    task = scorer.variant(template=template, verbalizer=verbalizer, triggers=init)
    run = Search(cfg, scorer, task)
    dev = scorer.rows("dev")
    if "triggers" not in state:  # iteration 0: the starting triggers
        state.update(init=init, verbalizer=verbalizer, iteration=0, triggers=init, history=[])
        state["history"].append({"iteration": 0, "triggers": init, "accepted": True,
                                 **run.dev(dev, task.trigger_ids)})
        state["wall_time_s"] = elapsed(state, started)
        started = time.perf_counter()
        sdir.save(state, state["history"])
    triggers = token_ids(tok, state["triggers"], "search_state.json triggers")
    for it in range(state["iteration"] + 1, s.iters + 1):
        triggers, record = run.step(triggers, it)
        last = state["history"][-1]
        scores = run.dev(dev, triggers) if record["accepted"] else {k: last[k] for k in ("dev_accuracy", "dev_loss")}
        record = {**record, "triggers": tok.convert_ids_to_tokens(triggers), **scores}
        state["history"].append(record)
        state.update(iteration=it, triggers=record["triggers"])
        log.info("autoprompt %d/%d: %s%s batch loss %.4f -> %.4f, dev accuracy %.4f", it, s.iters,
                 " ".join(record["triggers"]), " (swap kept)" if record["accepted"] else "", record["batch_loss"],
                 record["candidate_loss"] if record["accepted"] else record["batch_loss"], record["dev_accuracy"])
        if it % s.save_every == 0 or it == s.iters:
            state["wall_time_s"] = elapsed(state, started)
            started = time.perf_counter()
            sdir.save(state, state["history"])
    history = state["history"]
    top = min(history, key=lambda r: (-r["dev_accuracy"], r["dev_loss"], r["iteration"]))
    found = {"template": template, "triggers": top["triggers"], "verbalizer": state["verbalizer"]}
    best = {"split": "dev", "accuracy": top["dev_accuracy"], "loss": top["dev_loss"], "iteration": top["iteration"]}
    n_scored = sum(r.get("n_candidates", 0) for r in history)
    summary = finish(sdir, cfg, "autoprompt", found, best, n_scored, elapsed(state, started))
    return {**summary, "dir": str(sdir.path), "overrides": sdir.overrides.read_text().strip()}
