"""`kn-edit find-subject`: the subject found from a fact's prompts (kn_edit.locating.subject), for one fact or
measured against a data set's subjects (how often each rule picks the data set's subject)."""

from __future__ import annotations

import argparse
import json
import random

from .ui import add_model_argument, console, table


def register(sub: argparse._SubParsersAction) -> None:
    find = sub.add_parser("find-subject", help="find a fact's subject in its prompts (as update-fact does without "
                                               "--subject), or measure the rules on ParaRel / Known 1000")
    add_model_argument(find)
    find.add_argument("--prompt", "-p", action="append", dest="prompts", metavar="PROMPT",
                      help="a prompt of the fact (repeat for paraphrases)")
    find.add_argument("--old", help="the object the prompts complete with (default: the model's top answer)")
    find.add_argument("--facts", choices=["pararel", "known1000"], help="measure on this data set instead")
    find.add_argument("--data-dir", help="ParaRel folder or Known 1000 file (default: the download cache)")
    find.add_argument("--sample", type=int, default=200, help="facts sampled over the relations (default 200)")
    find.add_argument("--max-prompts", type=int, default=3, help="ParaRel: 1 to this many prompts a fact (default 3)")
    find.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    find.add_argument("--misses", type=int, default=10, help="show this many facts the default rule misses")
    find.add_argument("--json", action="store_true", help="print JSON only (for scripts)")
    find.set_defaults(func=run_find_subject)


def _top_answer(km, prompt: str) -> str:
    """The model's most likely next word (the first of its top 5 tokens that is not blank)."""
    return next((p.token.strip() for p in km.predict(prompt, top_k=5) if p.token.strip()), "")


def _sample(args: argparse.Namespace, masked: bool) -> list[tuple[str, str, list[str], str]]:
    """(fact id, subject, prompts, data set object) of ``--sample`` facts, round-robin over shuffled relations."""
    from ..data import load_known1000, load_pararel

    rng = random.Random(args.seed)
    if args.facts == "pararel":
        facts = load_pararel(args.data_dir, masked=masked)
    else:
        facts = load_known1000(args.data_dir, masked=masked)
    groups = [list(v) for _, v in sorted(facts.by_relation().items())]
    for g in groups:
        rng.shuffle(g)
    picked = []
    while len(picked) < args.sample and any(groups):
        for g in groups:
            if g and len(picked) < args.sample:
                picked.append(g.pop())
    out = []
    for r in picked:
        prompts = list(r.all_prompts)
        k = rng.randint(1, min(max(args.max_prompts, 1), len(prompts)))
        out.append((r.fact_id, r.subject, rng.sample(prompts, k), r.object))
    return out


def run_find_subject(args: argparse.Namespace) -> int:
    from .. import load
    from ..errors import ConfigError
    from ..locating.subject import find_subject
    from ..progress import default_reporter

    if bool(args.facts) == bool(args.prompts):
        raise ConfigError("give either --prompt (one fact) or --facts pararel|known1000 (the measurement)")
    if args.sample < 1 or args.max_prompts < 1:
        raise ConfigError("--sample and --max-prompts must be at least 1")
    km = load(args.model, device=args.device, reporter=default_reporter(args.json))
    if args.prompts:
        old = args.old or _top_answer(km, args.prompts[0])
        guess = find_subject(km, args.prompts, old, score_all=True)
        if args.json:
            print(json.dumps({"subject": guess.subject, "found_in": guess.found_in, "prompts": guess.prompts,
                              "old": old, "scores": guess.scores}))
        else:
            con = console()
            con.print(guess.describe())
            rows = [[text, f"{d:+.4f}"] for text, d in sorted(guess.scores.items(), key=lambda x: -x[1])[:10]]
            if rows:
                con.print(table(f"candidates: drop of P({old!r}) when corrupted", ["span", "drop"], rows))
        return 0
    return _measure(km, args)


def _measure(km, args: argparse.Namespace) -> int:
    from ..errors import KnEditError
    from ..locating.subject import RULES, candidates, choose, corruption_drops

    facts = _sample(args, km.is_masked_lm)
    hits = {rule: 0 for rule in RULES}
    single = {rule: [0, 0] for rule in RULES}  # one-prompt facts: [hits, n]
    misses, errors, no_candidate = [], 0, 0
    for fact_id, subject, prompts, _ in facts:
        cands = candidates(prompts)
        if not cands:
            no_candidate += 1
            continue
        try:  # old = the model's answer, as update-fact edits only facts the model predicts
            drops = corruption_drops(km, prompts, _top_answer(km, prompts[0]), [c.text for c in cands]).tolist()
        except KnEditError:
            errors += 1
            continue
        for rule in RULES:
            got = choose(cands, drops, rule).text
            hits[rule] += got == subject
            if len(prompts) == 1:
                single[rule][0] += got == subject
                single[rule][1] += 1
            if rule == RULES[0] and got != subject and len(misses) < args.misses:
                misses.append([fact_id, subject, got, " | ".join(prompts)])
    n = len(facts)
    result = {
        "facts": args.facts, "sample": n, "seed": args.seed, "model": km.name, "no_candidate": no_candidate,
        "errors": errors,
        "agreement": {rule: hits[rule] / n for rule in RULES},
        "single_prompt": {rule: (h / m if m else None) for rule, (h, m) in single.items()},
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    con = console()
    m = single[RULES[0]][1]
    rows = [[rule, f"{hits[rule] / n:.1%}", f"{single[rule][0] / m:.1%}" if m else "-"] for rule in RULES]
    con.print(table(f"{km.name}: subject found = the data set's, {n} {args.facts} facts (seed {args.seed})",
                    ["rule", "all facts", f"one prompt ({m})"], rows))
    con.print(f"no candidate span: {no_candidate}; facts the model cannot encode: {errors}")
    if misses:
        con.print(table(f"misses of {RULES[0]!r}", ["fact", "subject", "found", "prompts"], misses))
    return 0
