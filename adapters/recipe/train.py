"""Training: the tiny Llama base model from scratch and the LoRA adapters on it, with plain torch loops.

Each row is rendered with the chat template exactly as vLLM renders a request (prompt plus generation prompt) and
followed by its answer and `<|im_end|>`; the loss covers only the answer tokens. Batches are drawn in a fixed order
from a seeded `random.Random` (no DataLoader workers), the model is initialised from a seeded torch generator, and
torch runs with a fixed thread count and deterministic algorithms: the same recipe gives bit-identical weights on
the same kind of CPU.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .params import AdapterSpec, ModelParams, TrainParams
from .tokenizer import IM_END, PAD, prompt_text, token_ids

IGNORE = -100
POOL = 8  # batches sorted together by length
DECAY = 0.2  # the share of steps over which the learning rate decays


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    labels: tuple[int, ...]


def configure_torch(threads: int) -> None:
    """Fixed threads (reduction order depends on them) and deterministic kernels where torch has them."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def encode(tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict[str, Any]]) -> list[Example]:
    """Prompt tokens (masked out of the loss) followed by answer tokens and `<|im_end|>` (learned)."""
    prompts = [prompt_text(row["messages"][:-1]) for row in rows]
    answers = [row["messages"][-1]["content"] + IM_END for row in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return [
        Example(tuple(p + a), tuple([IGNORE] * len(p) + a))
        for p, a in zip(prompt_ids, answer_ids, strict=True)
    ]


def batches(
    examples: Sequence[Example], size: int, steps: int, seed: int, pad: int
) -> Iterator[dict[str, Any]]:
    """`steps` right-padded batches from seeded permutations of the examples, epoch after epoch. Each pool of
    `POOL` batches is sorted by length before it is cut, so a batch holds rows of similar length (less padding:
    a prompt with the RAG text is about three times as long as one without), then the pool's batches are shuffled."""
    rng = random.Random(seed)
    queue: list[list[int]] = []
    order: list[int] = []
    for _ in range(steps):
        if not queue:
            if len(order) < size * POOL:
                epoch = list(range(len(examples)))
                rng.shuffle(epoch)
                order += epoch
            pool, order = (
                sorted(order[: size * POOL], key=lambda i: len(examples[i].ids)),
                order[size * POOL :],
            )
            queue = [pool[i : i + size] for i in range(0, len(pool), size)]
            rng.shuffle(queue)
        yield collate([examples[i] for i in queue.pop()], pad)


def collate(chunk: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, example in enumerate(chunk):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_at(step: int, params: TrainParams) -> float:
    """Warm-up, a long constant stretch, then a linear decay to a tenth over the last `DECAY` of the steps (a
    decaying rate postpones sudden transitions such as learning to copy, which a cosine decay never reached)."""
    if step < params.warmup:
        return params.lr * (step + 1) / params.warmup
    decay_from = params.steps * (1 - DECAY)
    if step < decay_from:
        return params.lr
    return params.lr * (1 - 0.9 * (step - decay_from) / (params.steps - decay_from))


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens. The LM head runs only where a label is learned (a quarter of
    the tokens): it is a third of the model's FLOPs per token, so this makes a step about a quarter cheaper."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = causal_lm.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    learned = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][learned])
    return torch.nn.functional.cross_entropy(logits.float(), targets[learned])


def fit(model: torch.nn.Module, examples: Sequence[Example], params: TrainParams, pad: int) -> list[float]:
    """Train `model`'s trainable parameters with AdamW; returns the loss of every step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    model.train()
    losses = []
    for step, batch in enumerate(batches(examples, params.batch, params.steps, params.seed, pad)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, params)
        loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def new_base_model(tokenizer: PreTrainedTokenizerFast, params: ModelParams, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.layers,
        num_attention_heads=params.heads,
        num_key_value_heads=params.heads,
        max_position_embeddings=params.max_positions,
        bos_token_id=token_ids(tokenizer, PAD),
        eos_token_id=token_ids(tokenizer, IM_END),
        pad_token_id=token_ids(tokenizer, PAD),
        tie_word_embeddings=True,  # copying a prompt token to the output is then the natural map
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lora_model(
    base: LlamaForCausalLM, spec: AdapterSpec, base_name: str, parent: PeftModel | None
) -> PeftModel:
    """A LoRA on a copy of `base` (the base itself stays untouched for the next adapter), starting from zero or,
    for a version trained further from an earlier one, from `parent`'s LoRA weights."""
    torch.manual_seed(spec.train.seed)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(spec.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.peft_config["default"].base_model_name_or_path = base_name  # the served name, not a local path
    if parent is not None:
        set_peft_model_state_dict(model, get_peft_model_state_dict(parent))
    return model
