"""`kn-edit models`, `kn-edit fetch` and `kn-edit predict`."""

from __future__ import annotations

import argparse

from ..models.provision import DEFAULT_MODEL
from .ui import add_model_argument, console, table


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list the offline models and whether they are cached")
    models.set_defaults(func=run_models)

    fetch = sub.add_parser("fetch", help="provision an offline model into the cache now (idempotent)")
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"offline model name (default: {DEFAULT_MODEL})")
    fetch.set_defaults(func=run_fetch)

    predict = sub.add_parser("predict", help="top-k predictions at a prompt's answer slot")
    add_model_argument(predict)
    predict.add_argument("prompt", help="text before the answer (masked LMs: with [MASK] or [Y])")
    predict.add_argument("--top-k", type=int, default=10, help="how many predictions to show (default 10)")
    predict.set_defaults(func=run_predict)


def run_models(args: argparse.Namespace) -> int:
    from ..models.provision import OFFLINE_MODELS, cache_root, is_cached

    rows = [
        [m.name + (" (default)" if m.default else ""), "cached" if is_cached(m.name) else "not cached", m.licence, m.description]
        for m in OFFLINE_MODELS.values()
    ]
    console().print(table(f"Offline models (cache: {cache_root()})", ["name", "status", "licence", "model"], rows))
    console().print("Any Hugging Face model id or local folder also works where the hub (or the folder) is reachable.")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from .. import load
    from ..errors import ConfigError

    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    km = load(args.model, device=args.device)
    preds = km.predict(args.prompt, top_k=args.top_k)
    rows = [[rank + 1, repr(p.token), p.token_id, p.prob] for rank, p in enumerate(preds)]
    console().print(table(f"{km.name}: {args.prompt!r}", ["rank", "token", "id", "prob"], rows))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from ..progress import RichReporter
    from ..models.provision import provision

    path = provision(args.name, RichReporter())
    console().print(f"{args.name}: cached at {path}")
    return 0
