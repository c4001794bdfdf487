"""ROME on smollm2-135m over ParaRel facts the model knows: the targets of issue 9 (section 4).

Per edit: success (the new object top-1 on every edit prompt, every token: ``EditReport.success``), held-out
paraphrases (P(new) > P(old), and new top-1), same-relation neighbours the model knew that it still answers
(split into those with the edited fact's old object and those with another object), the relative change of
Wikipedia perplexity (held-out slice), and seconds. Every edit is reverted (checked bit for bit) before the next.

    .venv/bin/python evaluations/rome_check.py                          # evaluations/results/rome_check.{json,md}
    .venv/bin/python evaluations/rome_check.py --variants "key_text=subject;key_text=prompts" --facts 16
    .venv/bin/python evaluations/rome_check.py --variants "layer=3;layer=5;layer=8" --facts 6 --out /tmp/sweep

Facts: those of evaluations/edit_rules.py (same relations, seed and selection: the prompts the model answers
right, at most ``--prompts`` of them); the new object is another object of the same relation.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "evaluations"))

import kn_edit  # noqa: E402
from kn_edit.models.likelihood import token_nll  # noqa: E402
from kn_edit.data import load_pararel, wiki_passages  # noqa: E402
from kn_edit.data.requests import prompt_top1  # noqa: E402
from kn_edit.editing import EditRequest, ledger_for  # noqa: E402
from kn_edit.editing.registry import method_config  # noqa: E402
from kn_edit.editing.rome import RomeEditor, key_statistics  # noqa: E402

from edit_rules import select_facts  # noqa: E402


def neighbours(km, root: Path, facts, seed: int, per_kind: int, scan: int) -> None:
    """fact["same"] / fact["other"]: (prompt, object) of other facts of its relation the model answers right
    on their first prompt, with the same object as the edited fact's old one / another object."""
    records = load_pararel(root, relations=sorted({f["relation"] for f in facts}), seed=seed).records
    edited = {f["fact_id"] for f in facts}
    known: dict[str, list] = {}
    for relation in sorted({f["relation"] for f in facts}):
        pool = [r for r in records if r.relation == relation and r.fact_id not in edited and r.prompts]
        random.Random(f"{seed}:neighbours:{relation}").shuffle(pool)
        pool = pool[:scan]
        ok = prompt_top1(km, [(r.prompts[0], r.object) for r in pool])
        known[relation] = [(r.prompts[0], r.object) for r, good in zip(pool, ok) if good]
    for f in facts:
        mine = known[f["relation"]]
        f["same"] = [x for x in mine if x[1] == f["old"]][:per_kind]
        f["other"] = [x for x in mine if x[1] != f["old"]][:per_kind]


@torch.no_grad()
def perplexity(km, ids: torch.Tensor, mask: torch.Tensor) -> float:
    nll, count = token_nll(km.model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    return math.exp(float(nll / count))


def heldout(km, fact) -> tuple[list[bool], list[bool]]:
    """Per held-out paraphrase: P(new) > P(old); new top-1 (every token)."""
    prompts = list(fact["heldout"])
    if not prompts:
        return [], []
    beats = [km.log_prob(p, fact["new"]) > km.log_prob(p, fact["old"]) for p in prompts]
    return beats, prompt_top1(km, [(p, fact["new"]) for p in prompts])


def run_variant(km, facts, overrides: dict, text, base_ppl: float):
    settings = method_config("rome", [], overrides)
    editor = RomeEditor(settings)
    rows = []
    for i, fact in enumerate(facts):
        state = km.value_weight(editor.settings.layer_for(km)).detach().clone()
        request = EditRequest(tuple(fact["prompts"]), fact["old"], fact["new"], subject=fact["subject"],
                              relation=fact["relation"])
        edit = editor.apply(km, [request])
        report, details = edit.report, edit.report.details
        beats, top = heldout(km, fact)
        same = prompt_top1(km, fact["same"]) if fact["same"] else []
        other = prompt_top1(km, fact["other"]) if fact["other"] else []
        ppl = perplexity(km, *text)
        edit.revert()
        assert torch.equal(km.value_weight(details.layer), state) and not ledger_for(km).active_edits, "revert failed"
        r = details.requests[0]
        rows.append({
            "fact_id": fact["fact_id"], "subject": fact["subject"], "old": fact["old"], "new": fact["new"],
            "success": report.success, "first_prompt": report.prompts[0].success,
            "margins": [p.margin for p in report.prompts],
            "heldout_beats": beats, "heldout_top1": top, "same_kept": same, "other_kept": other,
            "ppl_change": ppl / base_ppl - 1, "seconds": report.seconds, "steps": r.steps, "nll_last": r.nll_last,
            "kl_last": r.kl_last, "clamped": r.clamped, "delta_over_output": r.delta_norm / r.output_norm,
            "relative_update": r.relative_update,
        })
        print(f"  [{i + 1}/{len(facts)}] {fact['subject']!r}: {fact['old']!r} → {fact['new']!r} success={report.success} "
              f"heldout={sum(beats)}/{len(beats)} top1={sum(top)}/{len(top)} same={sum(same)}/{len(same)} "
              f"other={sum(other)}/{len(other)} ppl={100 * rows[-1]['ppl_change']:+.2f}% {report.seconds:.0f}s "
              f"steps={r.steps} nll={r.nll_last:.3f}", flush=True)
    return summarize(rows), rows


def summarize(rows) -> dict:
    pooled = lambda key: [x for r in rows for x in r[key]]  # noqa: E731
    share = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    ppl = [r["ppl_change"] for r in rows]
    return {
        "n_facts": len(rows),
        "success": share([r["success"] for r in rows]),
        "first_prompt_success": share([r["first_prompt"] for r in rows]),
        "heldout_new_beats_old": share(pooled("heldout_beats")), "heldout_top1": share(pooled("heldout_top1")),
        "n_heldout": len(pooled("heldout_beats")),
        "same_object_kept": share(pooled("same_kept")), "n_same_object": len(pooled("same_kept")),
        "other_object_kept": share(pooled("other_kept")), "n_other_object": len(pooled("other_kept")),
        "ppl_change_mean": share(ppl), "ppl_change_max": max(ppl) if ppl else None,
        "seconds_mean": share([r["seconds"] for r in rows]), "steps_mean": share([r["steps"] for r in rows]),
    }


def markdown(meta, summaries) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    lines = [
        "# ROME on smollm2-135m",
        "",
        f"{meta['n_facts']} ParaRel facts the model knows ({', '.join(meta['relations'])}), at most {meta['prompts']} "
        "edit prompts each (those the model answers right), new object another object of the same relation. "
        f"Key statistics: {meta['cov_tokens']} tokens of the Wikipedia key slice at layer {meta['layer']} "
        f"({meta['cov_note']}). Text perplexity: the first {meta['text_passages']} held-out Wikipedia passages cut at "
        f"{meta['text_tokens']} tokens (before: {meta['base_ppl']:.2f}). Generated by `evaluations/rome_check.py "
        f"{meta['argv']}` ({meta['seconds']:.0f} s wall, CPU, {meta['threads']} thread(s), on a machine shared with "
        "other jobs).",
        "",
        "| variant | success (all edit prompts) | first prompt | held-out P(new) > P(old) | held-out top-1 | same-object kept | other-object kept | text ppl mean / max | s per edit | v* steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {pct(s['success'])} | {pct(s['first_prompt_success'])} | {pct(s['heldout_new_beats_old'])} "
            f"(n={s['n_heldout']}) | {pct(s['heldout_top1'])} | {pct(s['same_object_kept'])} (n={s['n_same_object']}) | "
            f"{pct(s['other_object_kept'])} (n={s['n_other_object']}) | {100 * s['ppl_change_mean']:+.2f} % / "
            f"{100 * s['ppl_change_max']:+.2f} % | {s['seconds_mean']:.1f} | {s['steps_mean']:.1f} |")
    lines += ["", "Targets (issue 9): success ≥ 95 %, held-out P(new) > P(old) ≥ 95 % and top-1 ≥ 80 %, same-object "
              "neighbours kept ≥ 65 %, text perplexity ≤ +1 % mean. Neighbours: other facts of the edited relation the "
              "model answered right (first prompt) before the edit; kept = still answered right after it.", ""]
    return "\n".join(lines)


def add_fact_arguments(parser: argparse.ArgumentParser, neighbours: int, text_passages: int) -> None:
    """The options of the scripts that edit edit_rules' fact selection one by one (this one, batch_edit.py):
    model, data, which facts and neighbours, the perplexity text, threads, seed and output folder."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pararel"))
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--per-relation", type=int, default=2)
    parser.add_argument("--scan", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--neighbours", type=int, default=neighbours, help="per kind (same / other object) and fact")
    parser.add_argument("--text-passages", type=int, default=text_passages)
    parser.add_argument("--text-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "evaluations" / "results"))
    parser.add_argument("--facts-from", metavar="JSON",
                        help="the facts and neighbours of an earlier run of this script or batch_edit.py (its meta.facts)"
                        " instead of selecting them again (the selection of 100 facts takes ~20 min on one thread)")


def facts_from(path: Path, model: str) -> list[dict]:
    """The facts (with their held-out paraphrases and neighbours) that an earlier run on ``model`` wrote to its
    JSON's ``meta.facts``, as select_facts and neighbours return them; exits with a message on any other file."""
    try:
        meta = json.loads(path.read_text())["meta"]
        if meta["model"] != model:
            sys.exit(f"error: {path} holds facts selected on {meta['model']}, not {model}")
        facts = []
        for f in meta["facts"]:
            relation, _, _ = f["fact_id"].partition(":")
            facts.append({**f, "relation": relation, "prompts": list(f["prompts"]), "heldout": list(f["heldout"]),
                          "same": [tuple(x) for x in f["same"]], "other": [tuple(x) for x in f["other"]]})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: --facts-from {path}: not a results file with meta.facts ({type(exc).__name__}: {exc})")
    if not facts:
        sys.exit(f"error: --facts-from {path}: meta.facts is empty")
    return facts


def prepare(args):
    """(model, facts with their neighbours, the tokenized perplexity text, its perplexity) for ``args`` of
    add_fact_arguments."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    km = kn_edit.load(args.model, device="cpu")
    if args.facts_from:
        facts = facts_from(Path(args.facts_from), args.model)
        print(f"{len(facts)} facts read from {args.facts_from}", flush=True)
    else:
        facts = select_facts(km, Path(args.data), args.facts, args.per_relation, args.scan, args.seed, args.prompts)
        neighbours(km, Path(args.data), facts, args.seed, args.neighbours, scan=60)
        print(f"{len(facts)} facts selected ({time.time() - t0:.0f}s)", flush=True)
    texts = wiki_passages(args.text_passages)
    text = km.pad([torch.tensor(km.tokenizer(t)["input_ids"][: args.text_tokens]) for t in texts])
    return km, facts, text, perplexity(km, *text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fact_arguments(parser, neighbours=5, text_passages=16)
    parser.add_argument("--variants", default="", help="';'-separated override sets, e.g. 'layer=3;layer=5,steps=40'")
    parser.add_argument("--measure-covariance", action="store_true", help="also time the key statistics uncached")
    args = parser.parse_args()
    t0 = time.time()
    km, facts, text, base_ppl = prepare(args)

    defaults = RomeEditor().settings
    layer = defaults.layer_for(km)
    cov_note = ""
    if args.measure_covariance:
        fresh = key_statistics(km, layer, n_tokens=defaults.cov_tokens, max_length=defaults.cov_max_length, cache=False)
        cov_note = f"computed uncached in {fresh.seconds:.0f} s here; "
    cached = key_statistics(km, layer, n_tokens=defaults.cov_tokens, max_length=defaults.cov_max_length)
    cov_note += f"{'read from the cache' if cached.from_cache else 'computed'} in {cached.seconds:.1f} s"
    print(f"key statistics: {cov_note}", flush=True)

    variants = [v.strip() for v in args.variants.split(";")] if args.variants else [""]
    summaries, details = {}, {}
    for v in variants:
        overrides = dict(kv.split("=", 1) for kv in v.split(",") if kv)
        name = v or "defaults"
        t = time.time()
        print(f"{name}:", flush=True)
        summaries[name], details[name] = run_variant(km, facts, overrides, text, base_ppl)
        print(f"{name}: {json.dumps(summaries[name])} ({time.time() - t:.0f}s)", flush=True)
    meta = {"model": args.model, "n_facts": len(facts), "relations": sorted({f["relation"] for f in facts}),
            "prompts": args.prompts, "seed": args.seed, "base_ppl": base_ppl, "threads": args.threads,
            "layer": layer, "cov_tokens": cached.n_tokens, "cov_note": cov_note, "text_passages": args.text_passages,
            "text_tokens": args.text_tokens, "seconds": time.time() - t0, "argv": " ".join(sys.argv[1:]),
            "facts": [{k: f[k] for k in ("fact_id", "subject", "old", "new", "prompts", "heldout", "same", "other")}
                      for f in facts]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rome_check.json").write_text(json.dumps({"meta": meta, "summary": summaries, "facts": details}, indent=1))
    (out / "rome_check.md").write_text(markdown(meta, summaries))
    print(markdown(meta, summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
