"""Fine-tuning — the baseline of Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", Table 1 rows "Fine-Tune" (every weight trains) and "FT-top2" (only the top 2 blocks).

The backbone's own weights train; nothing is added. The input is the task's template fed to the
plain model, exactly as for hard-prompt (so this class reuses HardPrompt's forward and generate).

`trainable` chooses which weights. "The head" is what turns hidden states into the task's output:
the task's linear head (`method.head`, attached by ptune.build for classification tasks) when
there is one, else the model's LM head.
- `all`:   the whole backbone and the head ("Fine-Tune"). With a task head, an LM head the task
           never reads (BERT's MLM head) is left out: no gradient can reach it.
- `head`:  only the head.
- `top-k`: the top `k` blocks, the final norm after them, and the head ("FT-top2" with k=2).

Which blocks, per backbone kind:
- causal (GPT-2, Llama): the decoder's blocks, as in the paper.
- seq2seq (T5, BART): the paper's FT-top2 is defined for GPT-2 only; we take the top k *decoder*
  blocks, the decoder's final norm (T5's final_layer_norm; BART, post-LN, has none) and the LM
  head, and keep the encoder frozen: the blocks nearest the output, as for GPT-2.
- masked / encoder (BERT): the top k encoder layers and the task head (BERT has no final norm).

The final norm is every module beside the block list that runs after the last block, found by
forward hooks in one one-token pass at construction (GPT-2 `ln_f`, Llama `norm`, T5's decoder
`final_layer_norm`). Registration order would not do: BART's decoder registers
`layernorm_embedding` after its layers but applies it before them.

Tied head (GPT-2, SmolLM2, T5, BART: tie_word_embeddings): the LM head *is* the input embedding
matrix (for T5 and BART the one `shared` matrix of encoder and decoder). We train the tied matrix
as it is, so `head` and `top-k` also change the input embeddings. This is what the paper's own
code does: its finetune-top mode unfreezes `transformer.wte` (the tied matrix) with `ln_f` and the
top blocks. Untying would add a vocab x hidden matrix the base model does not have and an adapter
no HF model could load.

Saved tensors are named as in the backbone's state dict; a task head's as `head.*`. A tied matrix
is saved once, under the name `named_parameters()` keeps (the input embedding's, as in HF
checkpoints): safetensors refuses two names for one storage. Loading copies in place, so the tie
holds afterwards. `all` saves the whole backbone state dict (persistent buffers such as BART's
final_logits_bias too), so the adapter is a complete checkpoint.

Differences from the paper: our trainer (AdamW, one param group) applies trainer.weight_decay to
every tensor, biases and norms included (HF's Trainer, used by the paper, exempts them; our
default decay is 0, where this makes no difference). PEFT has no equivalent method.
"""

from __future__ import annotations

import torch
from torch import nn

from ptune.errors import PtuneError
from ptune.methods.hard_prompt import HardPrompt

TRAINABLE = ("all", "head", "top-k")
KINDS = ("causal", "seq2seq", "masked", "encoder")


def _probe_forward(model: nn.Module, kind: str) -> None:
    """One token through the model (two for an encoder-decoder: one each side)."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    extra = dict(decoder_input_ids=ids) if kind == "seq2seq" else {}
    with torch.no_grad():
        model(input_ids=ids, **extra)


def find_blocks(model: nn.Module, kind: str = "causal") -> tuple[str, nn.ModuleList, list[nn.Module]]:
    """(path of the block list in `model`, the list, the modules that run after it = final norm).

    The block list is the longest nn.ModuleList under the decoder (seq2seq) or `model.base_model`
    that no other ModuleList contains (the first one on ties); "after it" is read from the order in
    which a forward pass calls the list's siblings (see the module docstring).
    """
    stack = model.get_decoder() if kind == "seq2seq" else model.base_model
    lists = [(name, m) for name, m in stack.named_modules() if isinstance(m, nn.ModuleList)]
    # Outermost lists only: a T5 block holds its sub-layers in a ModuleList of its own (3 in a
    # decoder block), longer than the block list of a 2-block model.
    lists = [(name, m) for name, m in lists if not any(name.startswith(other + ".") for other, _ in lists)]
    if not lists:
        raise PtuneError(f"method.trainable=top-k found no list of transformer blocks in {type(model).__name__}; "
                         f"use method.trainable=all or method.trainable=head")
    path, blocks = max(lists, key=lambda item: len(item[1]))
    parent_path, _, attr = path.rpartition(".")
    siblings = [m for name, m in stack.get_submodule(parent_path).named_children() if name != attr]
    calls: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: calls.append(mod)) for m in [*siblings, blocks[-1]]]
    was_training = model.training
    try:
        model.eval()
        _probe_forward(model, kind)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    last = max(i for i, m in enumerate(calls) if m is blocks[-1])
    after = [m for m in siblings if any(c is m for c in calls[last + 1:])]
    stack_path = next(name for name, m in model.named_modules() if m is stack)
    return ".".join(p for p in (stack_path, path) if p), blocks, after


class FineTune(HardPrompt):
    # HardPrompt gives the plain model's model_inputs and generate (positions from the mask); the
    # two methods differ only in what trains and what is saved.
    name = "fine-tune"
    acts_on = "weights"
    trains = True
    trains_backbone = True

    def __init__(self, backbone, *, trainable: str, k: int, **_):
        super().__init__(backbone)
        if trainable not in TRAINABLE:
            raise PtuneError(f"method.trainable={trainable!r} is not one of {', '.join(TRAINABLE)}")
        model, kind = backbone.model, backbone.kind
        self.trainable, self.k, self.blocks = trainable, k, None
        # A masked or encoder model is fine-tuned here for classification: its output is the task's
        # linear head, attached after construction, or its MLM head under a verbalizer (attach_head).
        self._needs_task_head = kind in ("masked", "encoder")
        first = {id(p): n for n, p in model.named_parameters()}  # each tensor once, by its first name
        head = model.get_output_embeddings()
        self.tied = head is not None and head.weight is model.get_input_embeddings().weight
        if head is None and not self._needs_task_head and trainable != "all":
            raise PtuneError(f"{backbone.name} has no output head; use method.trainable=all")
        head_order = [id(p) for p in head.parameters()] if head is not None else []  # weight (, bias)
        head_ids = set(head_order)
        if trainable == "all":
            # base_model is the transformer without its output head (T5: the whole model, an untied
            # lm_head included, so output head tensors are taken out here and added back as the head).
            tied = {id(model.get_input_embeddings().weight)}
            body = [p for p in model.base_model.parameters() if id(p) not in head_ids - tied]
        elif trainable == "head":
            body = []
        else:
            path, blocks, after = find_blocks(model, kind)
            self.blocks = f"{path} ({len(blocks)} blocks)"
            if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(blocks)):
                raise PtuneError(f"method.k={k!r} is invalid: must be an integer from 1 to {len(blocks)} "
                                 f"(the blocks of {backbone.name})")
            body = [p for m in [*blocks[-k:], *after] for p in m.parameters()]
        self._body = list(dict.fromkeys(first[id(p)] for p in body))
        self._lm_head = [] if self._needs_task_head else [first[i] for i in head_order]
        # Under a verbalizer head (attach_head) a masked LM's output is its MLM head again: the output
        # embedding and every tensor outside base_model (BERT's cls.predictions.transform and bias).
        base = {id(p) for p in model.base_model.parameters()}
        self._word_head = list(dict.fromkeys([first[i] for i in head_order]
                                             + [n for n, p in model.named_parameters() if id(p) not in base]))
        self._sync_requires_grad()

    def _check_backbone(self, backbone) -> None:
        if backbone.kind not in KINDS:
            raise PtuneError(f"method=fine-tune does not know model.kind={backbone.kind}; "
                             f"use one of {', '.join(KINDS)}")

    def _task_head(self) -> dict[str, torch.Tensor]:
        """The method's own parameters: the task head's `head.*` once ptune.build attached one."""
        return dict(self.named_parameters())

    def attach_head(self, head: nn.Module) -> None:
        """A task head replaces the LM head as "the head": the LM head stops training. A verbalizer
        head (no tensors, `reads_lm_head`) reads the LM head's word scores: the LM head stays the head."""
        super().attach_head(head)
        if getattr(head, "reads_lm_head", False) and self._needs_task_head:
            self._needs_task_head, self._lm_head = False, self._word_head
        self._sync_requires_grad()

    def _backbone_names(self) -> list[str]:
        """State-dict names of the backbone tensors that train: the body, and the LM head unless a
        task head is the output."""
        if self._task_head() or self._needs_task_head:
            return self._body
        return list(dict.fromkeys(self._body + self._lm_head))

    def _sync_requires_grad(self) -> None:
        model = self.backbone.model
        model.requires_grad_(False)  # also clears requires_grad left by a method built before on this backbone
        params = dict(model.named_parameters())
        for n in self._backbone_names():
            params[n].requires_grad_(True)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The backbone parameters that train, by state-dict name (each shared tensor once), then the
        task head's as `head.*`.

        Looked up by name on each call, so a backbone whose parameters were replaced (moved with
        swapped tensors) still hands the optimizer the live ones.
        """
        own = self._task_head()
        if self._needs_task_head and not own:
            raise PtuneError(f"method=fine-tune on a {self.backbone.kind} model trains a classifier through a linear "
                             f"head or its MLM head; use a classification task with task.head=linear or task.head=verbalizer")
        params = dict(self.backbone.model.named_parameters())
        clash = sorted(set(own) & set(params))
        if clash:
            raise PtuneError(f"task head tensor {clash[0]} has the name of a backbone tensor of {self.backbone.name}")
        return {**{name: params[name] for name in self._backbone_names()}, **own}

    # -- saving --------------------------------------------------------------------------------
    def _aliases(self) -> set[str]:
        """Second names of shared tensors (lm_head.weight when tied): left out of what is saved."""
        model = self.backbone.model
        every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        every |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        first = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return every - first

    def adapter_tensors(self):
        """`all`: the whole backbone state dict (persistent buffers too) minus tie aliases; else the
        trained backbone tensors; then the task head's `head.*` tensors, if any."""
        own = {k: p.detach() for k, p in self._task_head().items()}
        if self.trainable == "all":
            aliases = self._aliases()
            return {**{k: v.detach() for k, v in self.backbone.model.state_dict().items() if k not in aliases}, **own}
        return {k: p.detach() for k, p in self.trainable_tensors().items()}

    def load_adapter_tensors(self, tensors):
        """Copy saved tensors into the backbone (and the task head) in place; a tied matrix stays tied.

        `head.*` tensors are optional here (a loader may restore the task head itself); every
        backbone tensor the adapter should hold must be there.
        """
        model = self.backbone.model
        own = self._task_head()
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(model.named_buffers(remove_duplicate=False))
        targets.update(own)
        missing = sorted(set(self.adapter_tensors()) - set(own) - set(tensors))
        unknown = sorted(set(tensors) - set(targets))
        if missing or unknown:
            what = f"lacks {missing[0]}" if missing else f"has {unknown[0]}, which {self.backbone.name} does not"
            raise PtuneError(f"adapter {what} ({len(missing)} missing, {len(unknown)} unknown); load it with the "
                             f"model, task head and method.trainable/method.k it was trained with")
        for name, value in tensors.items():  # all checked before any is copied: no half-loaded model
            if value.shape != targets[name].shape:
                raise PtuneError(f"adapter tensor {name} has shape {tuple(value.shape)}, this model needs "
                                 f"{tuple(targets[name].shape)}; load it with the model it was trained on")
        with torch.no_grad():
            for name, value in tensors.items():
                targets[name].copy_(value)

    def adapter_config(self):
        return dict(method=self.name, trainable=self.trainable, k=self.k, base_model=self.backbone.name,
                    blocks=self.blocks, tied_head=self.tied, task_head=bool(self._task_head()),
                    tensors=len(self.adapter_tensors()),
                    layout="backbone state-dict names (a tied head once, under the input embedding's name); "
                           "a task head as head.*")
