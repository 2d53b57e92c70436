"""`python -m engine.eval analysis`: what the scores of the policies see, per layer and KV head.

1. One exact prefill of the text with H2O at a budget above its length (nothing is evicted, and the
   store keeps every token's value vector and accumulated attention, `acc`: the column sums of the
   causal attention matrix, mean over the query heads of each KV head). From it, per layer and head:
   - the distribution of value L1 norms (quantiles, coefficient of variation);
   - the distribution of attention received: accumulated (`acc`) and per row that could see the token
     (`acc / (N - position)`, which removes the head start of early tokens);
   - the sinks: the share of all attention that the first --sinks tokens take, and their value norm
     against the median of the others; also the value-norm percentile of the --top tokens with the
     most attention (VATP's observation: high attention, small value norm).
2. For each policy at --budget: the positions it keeps after streaming the text token by token
   (prefill-only policies in chunks, as in `ppl`), as histograms over the text.
Numbers go to the JSON (--out), plots next to it.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from . import data, plots
from ..cli import COUNT, NON_NEGATIVE, Integer, add_model_args
from ..dist import rank
from .common import build_policy, load_llm, plot_path, run_cells, workers
from .ppl import resolve_budget, stream_nll, text_ids
from ..policies import list_policies, make_policy
from ..results import run_metadata, write_json

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a UTF-8 text file")
    src.add_argument("--dataset", help=f"a cached text: {', '.join(sorted(data.TEXTS))}")
    add_model_args(p)
    p.add_argument("--policies", default=",".join(n for n in list_policies() if n != "full"),
                   help="policies whose kept positions are shown (default: all but full)")
    p.set_defaults(budget=0.25)
    p.add_argument("--tokens", type=Integer(8), default=2048, help="text length, >= 8 (default 2048)")
    p.add_argument("--sink-tokens", type=NON_NEGATIVE, default=4,
                   help="the first tokens counted as sinks, >= 0 (default 4)")
    p.add_argument("--top", type=COUNT, default=8,
                   help="tokens with the most attention per head to check, >= 1 (default 8)")
    p.add_argument("--bins", type=COUNT, default=32, help="histogram bins over the text, >= 1 (default 32)")
    p.add_argument("--out", help="results JSON; plots are written next to it")


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"p{round(100 * k)}": float(v) for k, v in zip(QUANTILES, q)}


def head_stats(v: torch.Tensor, acc: torch.Tensor, pos: torch.Tensor, n_sinks: int, top: int) -> dict[str, Any]:
    """One (layer, KV head): v (N, D) values, acc (N,) accumulated attention, pos (N,) positions."""
    n = pos.shape[0]
    vnorm = v.double().abs().sum(-1)
    per_row = acc.double() / (n - pos.double())  # mean attention over the rows that could see the token
    share = acc.double() / acc.double().sum()
    rest = vnorm[pos >= n_sinks]
    top_idx = torch.topk(acc, min(top, n)).indices
    rank = vnorm.argsort().argsort().double() / max(n - 1, 1)  # value-norm percentile of every token
    return {
        "vnorm": {**_quantiles(vnorm), "mean": float(vnorm.mean()), "cv": float(vnorm.std() / vnorm.mean())},
        "attention_share": _quantiles(share),
        "attention_per_row": _quantiles(per_row),
        "sink_attention_share": float(share[pos < n_sinks].sum()),
        "sink_vnorm_over_median": float(vnorm[pos < n_sinks].mean() / rest.median()) if rest.numel() else None,
        "top_attention_positions": [int(pos[i]) for i in top_idx],
        "top_attention_vnorm_percentile": float(rank[top_idx].mean()),
    }


def value_attention(llm: Any, ids: torch.Tensor, n_sinks: int, top: int) -> tuple[list[list[dict]], list[dict]]:
    """Per-(layer, head) statistics from one exact prefill, plus the raw per-token arrays for the plots."""
    n = ids.shape[1]
    llm.policy = make_policy("h2o", budget=n + 2)  # above the length: nothing evicted, acc accumulated
    session = llm.session(max_new_tokens=1)
    session.feed(ids[0].tolist())
    stats, raw = [], []
    for layer in llm.store.layers:
        per_head, per_layer = [], {"vnorm": [], "per_row": []}
        for h in range(layer.pos.shape[1]):
            pos = layer.pos[0, h]
            order = pos.argsort()[pos.sort().values >= 0]  # valid slots in position order
            p, v, acc = pos[order], layer.v[0, h, order], layer.state["acc"][0, h, order]
            per_head.append(head_stats(v, acc, p, n_sinks, top))
            per_layer["vnorm"].append(v.double().abs().sum(-1))
            per_layer["per_row"].append(acc.double() / (n - p.double()))
        stats.append(per_head)
        raw.append({k: torch.cat(vs) for k, vs in per_layer.items()})
    return stats, raw


def kept_positions(llm: Any, policy: Any, ids: torch.Tensor, bins: int) -> dict[str, Any]:
    """Where the kept tokens lie after streaming the text: a histogram over [0, N) and per-layer means."""
    _, how = stream_nll(llm, policy, ids, None)
    n = llm.cache_stats().tokens_seen  # the token protocol never feeds the last token
    all_pos, layer_mean = [], []
    for layer in llm.store.layers:
        p = layer.pos[0]
        p = p[p >= 0].double()
        all_pos.append(p)
        layer_mean.append(float(p.mean() / n))
    pos = torch.cat(all_pos)
    counts = torch.histc(pos, bins=bins, min=0, max=n)
    return {"protocol": how, "budget_tokens": llm.cache_stats().budget,
            "histogram": (counts / counts.sum()).tolist(), "edges": [n * i / bins for i in range(bins + 1)],
            "mean_position": float(pos.mean() / n), "std_position": float(pos.std() / n),
            "share_first_quarter": float((pos < n / 4).double().mean()),
            "share_last_quarter": float((pos >= 3 * n / 4).double().mean()), "layer_mean_position": layer_mean}


def run(ns: argparse.Namespace) -> int:
    names = [s.strip() for s in ns.policies.split(",") if s.strip()]
    ns.policies = ",".join(names)
    budget = resolve_budget(ns.budget, ns.tokens)
    policies = {name: build_policy(ns, name, budget) for name in names}
    text = data.read_text_file(ns.text) if ns.text else data.text(ns.dataset)
    team = workers(1, ns.device)  # under torchrun the policies are spread over the ranks, each loading the model whole
    llm = load_llm(ns, team)
    if ns.tokens > llm.args.max_seq_len:
        raise ValueError(f"--tokens {ns.tokens} exceeds the model context ({llm.args.max_seq_len})")
    ids = torch.tensor([text_ids(llm.tokenizer, text, ns.tokens)], device=llm.device)
    stats, raw = value_attention(llm, ids, ns.sink_tokens, ns.top)
    kept = dict(zip(policies, run_cells(list(policies.values()), lambda p: kept_positions(llm, p, ids, ns.bins),
                                        team, "kept positions")))
    if rank() != 0:  # rank 0 writes, reports and plots
        return 0
    doc = {"meta": {"eval": "analysis", "model": str(llm.source), "text": ns.text or ns.dataset, "tokens": ns.tokens,
                    "sink_tokens": ns.sink_tokens, "top": ns.top, "budget": ns.budget, "budget_tokens": budget,
                    **run_metadata()},
           "layers": stats, "summary": summarize(stats), "kept_positions": kept}
    if ns.out:
        print(f"results: {write_json(ns.out, doc)}")
    print(report(doc))
    for path in plot(doc, raw, ns.out):
        print(f"plot: {path}")
    return 0


def summarize(stats: list[list[dict]]) -> dict[str, Any]:
    """Means over the heads of each layer, the numbers the claims are about."""
    def mean(key: str, sub: str | None = None) -> list[float]:
        return [sum((h[key][sub] if sub else h[key]) for h in heads) / len(heads) for heads in stats]

    return {"vnorm_cv": mean("vnorm", "cv"), "vnorm_max_over_min": [
                sum(h["vnorm"]["p100"] / h["vnorm"]["p0"] for h in heads) / len(heads) for heads in stats],
            "sink_attention_share": mean("sink_attention_share"),
            "sink_vnorm_over_median": mean("sink_vnorm_over_median"),
            "top_attention_vnorm_percentile": mean("top_attention_vnorm_percentile")}


def report(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    cols = ("vnorm_cv", "vnorm_max_over_min", "sink_attention_share", "sink_vnorm_over_median",
            "top_attention_vnorm_percentile")
    rows = ["layer  vnorm cv  max/min  sink attn  sink vnorm/med  top-attn vnorm pct"]
    rows += [f"{i:>5}" + "".join(f"{s[c][i]:>{w}.3f}" for c, w in zip(cols, (10, 9, 11, 16, 20)))
             for i in range(len(s["vnorm_cv"]))]
    rows.append("\npolicy         mean pos    std  first 1/4  last 1/4")
    keys = ("mean_position", "std_position", "share_first_quarter", "share_last_quarter")
    rows += [f"{name:<14}" + "".join(f"{k[c]:>{w}.3f}" for c, w in zip(keys, (9, 7, 11, 10)))
             for name, k in doc["kept_positions"].items()]
    return "\n".join(rows)


def plot(doc: dict[str, Any], raw: list[dict[str, torch.Tensor]], out: str | None) -> list:
    made = []
    s, n_layers = doc["summary"], len(doc["layers"])
    path = plot_path(out, "-vnorm.png")
    if path:
        made.append(plots.boxes(path, {str(i): r["vnorm"].tolist() for i, r in enumerate(raw)}, "layer",
                                "value L1 norm", "value L1 norms per layer (all KV heads, 5-95%)", logy=True))
    path = plot_path(out, "-sinks.png")
    if path:
        layers = list(range(n_layers))
        panels = {"sink share of attention": {"first tokens": (layers, s["sink_attention_share"])},
                  "sink value norm / median": {"first tokens": (layers, s["sink_vnorm_over_median"])},
                  "value-norm percentile of the top-attention tokens":
                      {"top tokens": (layers, s["top_attention_vnorm_percentile"])}}
        made.append(plots.lines(path, panels, "layer", "",
                                f"sinks (first {doc['meta']['sink_tokens']} tokens) and top-attention tokens"))
    path = plot_path(out, "-scatter.png")
    if path:
        picks = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
        panels = {f"layer {i}": {"tokens": (raw[i]["per_row"].tolist(), raw[i]["vnorm"].tolist())} for i in picks}
        made.append(plots.scatters(path, panels, "attention per row that sees the token", "value L1 norm",
                                   "attention received vs value norm", logx=True, logy=True))
    path = plot_path(out, "-positions.png")
    if path:
        hists = {name: (k["edges"], k["histogram"]) for name, k in doc["kept_positions"].items()}
        meta = doc["meta"]
        made.append(plots.histograms(path, hists, "position in the text", "share of kept tokens",
                                     f"positions kept at budget {meta['budget_tokens']} of {meta['tokens']}"))
    return [p for p in made if p]
