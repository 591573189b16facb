"""Assemble a bundle (layout: pudding_mlx.bundle) from a converted LLM, candidate sets and,
optionally, a router.

    build_bundle(llm_dir, out, candidates="cand-k7.json", router="my-router/")

`llm_dir` is an mlx-lm model directory (what `convert_llm` writes). `candidates` is the search's
candidates file, a plain JSON list of lists of 0-based block indices, or such a list in Python.
`router` is an MLX router folder (what `convert_router` writes) or a PyTorch router source that
`convert_router` reads; its number of outputs must equal the number of candidate sets. Sets found
only by the search's "mix" chains (SLEB-style baselines) are not router candidates and are left out.

Everything is built in a temporary folder beside OUT, loaded back as a check, then moved into
place: OUT is either the complete bundle or untouched. An existing OUT needs force=True.
"""

import os
import shutil
from pathlib import Path
from typing import Optional

from pudding_mlx.atomic import building
from pudding_mlx.bundle import (MANIFEST, Candidate, Manifest, RouterSettings, config_blocks, parse_manifest,
                                write_manifest)
from pudding_mlx.candidates import MIX, provenance as candidates_provenance, read_candidates
from pudding_mlx.errors import PuddingError
from pudding_mlx.jsonio import read_json


def llm_blocks(llm_dir: Path) -> int:
    """The block count of the mlx-lm model directory `llm_dir` (which must hold weights)."""
    config_path = llm_dir / "config.json"
    if not config_path.is_file():
        raise PuddingError(f"{config_path}: missing; --llm must be an mlx-lm model directory (convert one with `pudding-mlx convert llm`)")
    n = config_blocks(llm_dir)
    if n is None:
        raise PuddingError(f"{config_path}: field 'num_hidden_layers' is missing")
    if not list(llm_dir.glob("model*.safetensors")):
        raise PuddingError(f"{llm_dir}: no model*.safetensors; convert the LLM first")
    return n


def _candidates(candidates, n_blocks: int):
    """(list of Candidate, provenance) from a file or a list; mix-only sets dropped."""
    provenance = {}
    if isinstance(candidates, (str, os.PathLike)):
        entries = read_candidates(Path(candidates), n_blocks)
        provenance = candidates_provenance(candidates)
    else:
        entries = [c if isinstance(c, dict) else {"omitted": list(c)} for c in candidates]
    out, tasks, losses = [], [], []
    for c in entries:
        sources = c.get("sources") or [[c.get("task"), c.get("loss")]]
        kept = [s for s in sources if s[0] != MIX]
        if sources and not kept:
            continue
        task, loss = (kept[0] if kept else [None, None])
        out.append(Candidate(tuple(sorted(c["omitted"])), task, loss, c.get("order")))
        for t, l in kept:
            if t and t not in tasks:
                tasks.append(t)
            if l and l not in losses:
                losses.append(l)
    if tasks:
        provenance.update(tasks=tasks, losses=losses)
    return out, provenance


def build_bundle(llm_dir, out, candidates=None, router=None, provenance: Optional[dict] = None,
                 force: bool = False, default_routing: Optional[dict] = None, adapters=(), predictor=None) -> Path:
    """`adapters`: healing adapter folders (PEFT LoRA from `train heal`, converted here, or already
    converted), each kept as adapters/<its folder name>; checked against the LLM by loading the bundle.
    `predictor`: a loss predictor folder (`train adaptive-report`, pudding_mlx.adaptive), kept as
    predictor/ (manifest "adaptive", schema 4): its sets must be dense or among the candidates, its
    hidden size the LLM's, its `after` a block the routed prefill can stop at."""
    llm_dir, out = Path(llm_dir), Path(out)
    if out.exists() and not force:
        raise PuddingError(f"{out}: already exists; pass --force to replace it")
    if not llm_dir.is_dir():
        raise PuddingError(f"{llm_dir}: no such directory (the converted LLM)")
    n_blocks = llm_blocks(llm_dir)
    cands, prov = _candidates(candidates, n_blocks) if candidates is not None else ([], {})
    prov.update(provenance or {})
    if router is not None and not cands:
        raise PuddingError("a router needs candidate sets: pass --candidates")
    if predictor is not None:
        _check_predictor(Path(predictor), llm_dir, cands, n_blocks)

    with building(out, force) as tmp:
        for f in llm_dir.iterdir():
            if f.name in (MANIFEST, "router"):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        settings = None
        if router is not None:
            settings = _add_router(Path(router), tmp / "router", cands)
        entries = _add_adapters([Path(a) for a in adapters], tmp / "adapters")
        adaptive = None
        if predictor is not None:
            from pudding_mlx.adaptive import SETTINGS_FILE, WEIGHTS_FILE

            (tmp / "predictor").mkdir()
            for name in (SETTINGS_FILE, WEIGHTS_FILE):
                shutil.copy2(Path(predictor) / name, tmp / "predictor" / name)
            adaptive = {"path": "predictor"}
        manifest = Manifest(num_blocks=n_blocks, candidates=cands, router=settings, provenance=prov,
                            default_routing=default_routing, adapters=entries, adaptive=adaptive)
        # the same checks a user's load runs, before anything is visible at OUT
        parse_manifest(manifest.to_json(), str(out / MANIFEST), n_blocks)
        write_manifest(tmp, manifest)
        if entries:  # the adapters' tensors against the LLM's layers, and against the routers' read points
            from pudding_mlx.load import load

            load(str(tmp), check_memory=False)
            if predictor is not None:
                load(str(tmp), check_memory=False, max_loss=float("inf"))
    return out


def _check_predictor(src: Path, llm_dir: Path, cands, n_blocks: int) -> None:
    """The loss predictor folder read as the runtime reads it (one line per fault), against the LLM's
    width and blocks and the bundle's candidate sets."""
    from pudding_mlx.adaptive import read_predictor
    from pudding_mlx.adaptive_router import check_predictor

    if not src.is_dir():
        raise PuddingError(f"{src}: no such folder (--predictor: a loss predictor from `pudding-mlx train "
                           "adaptive-report --predictor-out`)")
    config = read_json(llm_dir / "config.json", "the LLM's config")
    hidden = config.get("text_config", config).get("hidden_size")
    predictor = read_predictor(src, hidden_size=hidden)
    check_predictor(predictor, src / "predictor.json", [c.omitted for c in cands], n_blocks)


def _add_adapters(sources, dest: Path) -> list:
    """Copy (or convert, from PEFT) each adapter into dest/<name>; the manifest's entries."""
    from pudding_mlx.convert.adapter import convert_adapter, is_runtime_adapter

    entries = []
    for src in sources:
        if not src.is_dir():
            raise PuddingError(f"{src}: no such folder (--adapter: a `train heal` output or a converted adapter)")
        name = src.name
        if any(e["name"] == name for e in entries):
            raise PuddingError(f"{src}: another --adapter has the folder name {name!r}; rename one of them")
        dest.mkdir(exist_ok=True)
        if is_runtime_adapter(src):
            shutil.copytree(src, dest / name)
        else:
            convert_adapter(src, dest / name)
        entries.append({"name": name, "path": f"adapters/{name}"})
    return entries


def _add_hidden_router(src: Path, dest: Path, cands) -> RouterSettings:
    """A hidden-state router (`train router --variant probe`): its sets must be the candidates, in
    order; router.json and head.safetensors are copied (the head is checked against the LLM when
    the bundle loads)."""
    from pudding_mlx.hidden_router import HEAD_FILE, ROUTER_FILE

    settings = read_json(src / ROUTER_FILE, "the hidden-state router's settings", "retrain the router")
    if [sorted(s) for s in settings.get("sets", [])] != [list(c.omitted) for c in cands]:
        raise PuddingError(f"{src / ROUTER_FILE}: field 'sets' (the router's outputs) differs from the candidate "
                           "sets, in content or order; pass the candidates file the router was trained with")
    if not (src / HEAD_FILE).is_file():
        raise PuddingError(f"{src / HEAD_FILE}: missing; retrain the router")
    dest.mkdir()
    for name in (ROUTER_FILE, HEAD_FILE):
        shutil.copy2(src / name, dest / name)
    return RouterSettings(path="router", max_tokens=int(settings.get("max_tokens", 1024)), lowercase=False,
                          kind="hidden")


def _add_router(src: Path, dest: Path, cands) -> RouterSettings:
    from pudding_mlx.hidden_router import is_hidden_router
    from pudding_mlx.router import FORMAT, SETTINGS, load_router

    if is_hidden_router(src):
        return _add_hidden_router(src, dest, cands)
    n_candidates = len(cands)
    head = src / "head.json"  # a light router from `train router` records the sets it scores
    if head.is_file():
        trained_on = read_json(head, "the light router's head description").get("sets")
        if trained_on is not None and [sorted(s) for s in trained_on] != [list(c.omitted) for c in cands]:
            raise PuddingError(f"{head}: field 'sets' (the router's outputs) differs from the candidate sets, "
                               "in content or order; pass the candidates file the router was trained with")

    settings_path = src / SETTINGS
    is_mlx = settings_path.is_file() and read_json(settings_path, "the router settings").get("format") == FORMAT
    if is_mlx:
        shutil.copytree(src, dest)
    else:
        from pudding_mlx.convert.router import convert_router

        convert_router(src, dest, expect_outputs=n_candidates)
    routed = load_router(dest, num_outputs=n_candidates)  # one line if the head size differs
    settings = read_json(dest / SETTINGS, "the router settings")
    return RouterSettings(path="router", max_tokens=int(settings.get("max_length", 512)),
                          lowercase=bool(settings.get("lowercase", True))) if routed else None
