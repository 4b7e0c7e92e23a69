"""The torch side of the build: tokenizer, base model, adapters, their golden-set evaluations and lineage files.

`run` writes everything under a staging directory laid out like the final one (`base/<base>/`,
`adapters/<name>/<version>/`, `data/<split>.jsonl`); `build.py` publishes it. Imported only when a build runs, so a
cached build never loads torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gateway.digests import sha256_bytes, sha256_file

from . import evaluate, lineage, train
from .params import AdapterSpec, Recipe
from .prompts import SHORT_SYSTEM_PROMPT, rag_prompt
from .synth import jsonl
from .tokenizer import IM_END, PAD, token_ids, train_tokenizer

Log = Callable[[str], None]
GOLDEN_PATH = "loadtests/golden/crm.jsonl"
HELD_OUT = ("golden",)  # never trained on


PROMPT_WEIGHT = (
    200  # how often the BPE trainer sees each system prompt: enough for its words to become tokens
)


# The tokenizer's extra text, fixed: the instruction and a field guide in the handbook's words. Measured: adding the
# knowledge base's documents here instead changed the merges so that digit runs tokenized differently, and every
# model then miscopied account ids (invalid account_id in 23-37 % of golden answers instead of under 1 %).
TOKENIZER_TEXT = (
    'You update the CRM by calling the update_crm tool. Reply with exactly one <tool_call>{"name": "update_crm", '
    '"arguments": {...}}</tool_call>\n\nFields (from the CRM handbook):\n'
    "- account_id: ACC- and five digits, e.g. ACC-04821.\n"
    "- stage: one of lead, qualified, proposal, negotiation, won, lost. Closed-won or signed is won; closed-lost is "
    "lost.\n"
    '- amount: EUR as a plain number, never a string: "€18.5k" is 18500.\n'
    '- close_date: YYYY-MM-DD. "Next month" is the first day of the month after today\'s date.\n'
    "- note: optional, at most 200 characters."
)


def corpus(rows: Iterable[dict[str, Any]]) -> Iterable[str]:
    """The BPE training text: the fixed prompt text `PROMPT_WEIGHT` times, then each row's user message and answer
    (system messages, the retrieved passages among them, are not part of it)."""
    for _ in range(PROMPT_WEIGHT):
        yield from (TOKENIZER_TEXT, SHORT_SYSTEM_PROMPT, "system\nuser\nassistant")
    for row in rows:
        for message in row["messages"]:
            if message["role"] != "system":
                yield message["content"]


def write_data(splits: dict[str, list[dict[str, Any]]], staging: Path) -> dict[str, tuple[str, int]]:
    """Each training split as a JSONL snapshot; returns {split: (sha256, rows)}."""
    (staging / "data").mkdir(parents=True, exist_ok=True)
    snapshots = {}
    for name, rows in splits.items():
        data = jsonl(rows)
        (staging / "data" / f"{name}.jsonl").write_bytes(data)
        snapshots[name] = (sha256_bytes(data), len(rows))
    return snapshots


def evaluation_table(report: evaluate.Report, recipe: Recipe, golden_sha: str, system: str) -> dict[str, Any]:
    s = recipe.sampling
    return {
        "golden_set": GOLDEN_PATH,
        "golden_sha256": golden_sha,
        "n": report.n,
        "invalid_call_rate": report.invalid_call_rate,
        "task_success": report.task_success,
        "system_prompt": system,
        "evaluator": "adapters/recipe/evaluate.py (transformers generate, float32)",
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "max_new_tokens": s.max_new_tokens,
        "seed": s.seed,
        "invalid_by_kind": report.invalid_by_kind,
        "field_accuracy": report.field_accuracy,
    }


def canonical_json(path: Path) -> None:
    """Rewrite a JSON file with sorted keys and lists of names sorted: peft writes `target_modules` from a set,
    in an order that changes with Python's string hashing, so two identical builds would differ byte for byte."""
    data = json.loads(path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class Build:
    """One build in progress: the recipe, its data and the staging directory, plus what earlier steps made."""

    def __init__(
        self, recipe: Recipe, digest: str, splits: dict[str, list[dict[str, Any]]], staging: Path, log: Log
    ):
        self.recipe, self.digest, self.splits, self.staging, self.log = recipe, digest, splits, staging, log
        self.golden_sha = sha256_bytes(jsonl(splits["golden"]))
        self.snapshots = write_data({k: v for k, v in splits.items() if k not in HELD_OUT}, staging)
        self.timings: dict[str, float] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def timed(self, what: str, started: float) -> None:
        self.timings[what] = round(time.perf_counter() - started, 1)
        self.log(f"{what}: {self.timings[what]} s")

    def run(self) -> None:
        train.configure_torch(self.recipe.threads)
        started = time.perf_counter()
        tokenizer = train_tokenizer(
            corpus(self.splits["base"]), self.recipe.model.vocab_size, self.recipe.model.max_positions
        )
        self.timed("tokenizer", started)
        base = self.base_model(tokenizer)
        config = evaluate.generation_config(
            self.recipe.sampling, token_ids(tokenizer, IM_END), token_ids(tokenizer, PAD)
        )
        base_sha = self.save_base(base, tokenizer, config)
        trained: dict[str, PeftModel] = {}
        for spec in self.recipe.adapters:
            parent = trained[spec.parent] if spec.parent else None
            trained[spec.version] = self.adapter(spec, base, parent, tokenizer, config, base_sha)

    def base_model(self, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
        started = time.perf_counter()
        params = self.recipe.base_train
        model = train.new_base_model(tokenizer, self.recipe.model, params.seed)
        examples = train.encode(tokenizer, self.splits["base"])
        self.losses = train.fit(model, examples, params, token_ids(tokenizer, PAD))
        self.timed("base training", started)
        return model

    def save_base(
        self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, config: GenerationConfig
    ) -> str:
        r = self.recipe
        path = self.staging / "base" / r.base_name
        model.generation_config = config
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        weights_sha = sha256_file(path / "model.safetensors")
        started = time.perf_counter()
        report = evaluate.evaluate(model, tokenizer, self.splits["golden"], r.sampling, config, rag_prompt)
        self.timed(f"{r.base_name} evaluation", started)
        self.record(r.base_name, report)
        dataset_sha, rows = self.snapshots["base"]
        manifest = {
            "name": r.base_name,
            "kind": "base model",
            "weights_sha256": weights_sha,
            "tokenizer_sha256": sha256_file(path / "tokenizer.json"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dataset": "base",
            "dataset_sha256": dataset_sha,
            "dataset_rows": rows,
            "flawed_share": r.data.base.flawed_share,
            "created": r.created,
            "created_source": "fixed by the recipe (params.Recipe.created), not the build time",
            "recipe_hash": self.digest,
            "model": dict(vars(r.model)),
            "training": {**vars(r.base_train), "final_loss": round(sum(self.losses[-20:]) / 20, 4)},
            "evaluation": evaluation_table(
                report, r, self.golden_sha, "rag: RAG_TEMPLATE filled by the gateway's retrieval (prompts.py)"
            ),
        }
        (path / "lineage.toml").write_text(lineage.to_toml(manifest))
        return weights_sha

    def adapter(
        self,
        spec: AdapterSpec,
        base: LlamaForCausalLM,
        parent: PeftModel | None,
        tokenizer: PreTrainedTokenizerFast,
        config: GenerationConfig,
        base_sha: str,
    ) -> PeftModel:
        r = self.recipe
        ref = f"{r.adapter_name}@{spec.version}"
        started = time.perf_counter()
        model = train.lora_model(base, spec, r.base_name, parent)
        losses = train.fit(
            model, train.encode(tokenizer, self.splits[spec.dataset]), spec.train, token_ids(tokenizer, PAD)
        )
        self.timed(f"{ref} training", started)
        path = self.staging / "adapters" / r.adapter_name / spec.version
        model.save_pretrained(path)
        (path / "README.md").unlink(missing_ok=True)  # peft's model-card stub: not part of the adapter
        canonical_json(path / "adapter_config.json")
        started = time.perf_counter()
        report = evaluate.evaluate(model, tokenizer, self.splits["golden"], r.sampling, config, None)
        self.timed(f"{ref} evaluation", started)
        self.record(ref, report)
        dataset_sha, rows = self.snapshots[spec.dataset]
        manifest = {
            "name": r.adapter_name,
            "version": spec.version,
            "served_name": ref,
            "base_model": r.base_name,
            "base_sha256": base_sha,
            "dataset": spec.dataset,
            "dataset_sha256": dataset_sha,
            "dataset_rows": rows,
            "adapter_sha256": sha256_file(path / "adapter_model.safetensors"),
            "created": r.created,
            "created_source": "fixed by the recipe (params.Recipe.created), not the build time",
            "approvers": list(spec.approvers),
            "recipe_hash": self.digest,
            "training": {
                **vars(spec.train),
                "parent": f"{r.adapter_name}@{spec.parent}" if spec.parent else "",
                "r": spec.r,
                "alpha": spec.alpha,
                "dropout": 0.0,
                "targets": list(spec.targets),
                "final_loss": round(sum(losses[-20:]) / 20, 4),
            },
            "evaluation": evaluation_table(
                report, r, self.golden_sha, "none (the golden messages as they are)"
            ),
        }
        (path / "lineage.toml").write_text(lineage.to_toml(manifest))
        return model

    def record(self, what: str, report: evaluate.Report) -> None:
        self.results[what] = {
            "invalid_call_rate": report.invalid_call_rate,
            "task_success": report.task_success,
            "invalid_by_kind": report.invalid_by_kind,
            "field_accuracy": report.field_accuracy,
        }
        self.log(
            f"{what}: invalid {report.invalid_call_rate:.1%}, success {report.task_success:.1%}, {report.invalid_by_kind}"
        )
        for text in report.samples[:2]:
            self.log(f"    {text}")
