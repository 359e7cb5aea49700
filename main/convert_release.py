"""One-off conversion of the authors' quick-reproduce release (and of Torch-Pruning's base models) into this
project's weights-only checkpoints. Separate from every run mode: run it once, then start final runs from its output.

    # the authors' release: final/<task>/<method>/reproduce_<k>/{model.pth, metanetwork.pth} (download.zip)
    python main/convert_release.py final/resnet56_on_CIFAR10/group_l2_norm_max_normalizer/reproduce_0 \\
        --code /path/to/MetaPruning --trust-pickles
    # a weights-only state dict, e.g. Torch-Pruning's cifar10_resnet56.pth (nothing is unpickled)
    python main/convert_release.py --model-file cifar10_resnet56.pth --task resnet56_on_CIFAR10

The authors saved ``model.pth`` and ``metanetwork.pth`` with ``torch.save(module)``: whole pickled modules.
UNPICKLING RUNS CODE: a pickle names functions that run while it loads, so a file from a stranger can do anything
your account can. This script is the only place of the project that unpickles, and only when asked
(``--trust-pickles``): it loads each file in a child process whose import path starts with ``--code`` (a checkout of
the authors' public repository, github.com/Yewei-Liu/MetaPruning: the pickles name its classes, ``nn.GNN.MyGNN``,
``generate_dataset.resnet_family.ResNet``, ...; their package names collide with ours, hence the separate process)
and hands back plain tensors and numbers only. Files that are plain state dicts load weights-only, without
``--trust-pickles``. Everything else in the project reads weights-only checkpoints. If the pickles do not load with
the torch / torch_geometric installed here (the authors wrote theirs with older releases), ``--python`` runs the
child with the interpreter of an environment that has their versions (it needs torch and what the pickles name).

Output (``--out``, default ``<paths.output_dir>/authors_release/<task>/<method>/reproduce_<k>``; for
``--model-file``: ``<paths.output_dir>/external/<task>/<file stem>``):

* ``model.pt``: the network (``utils.checkpoint``: state dict + architecture spec, any widths), for ``final.model``;
* ``metanetwork.pt``: a ``nn.metanetwork.MetaNetwork`` checkpoint in ``nn.apply.save_metanetwork``'s format; its
  layout records ``legacy_fc_permutation=true`` (the authors' graphs decode the classifier scrambled, reference
  §4.7.1), so a final run must say ``codec.legacy_fc_permutation=true`` and refuses it otherwise;
* ``conversion.json``: per output the source file, its SHA-256 and size, the class it held, the key mapping, the
  keys dropped, where the sizes and residual ratios were read, and the final-run commands.

Key mappings: ``generate_dataset/models/authors.py`` (networks) and ``nn/authors.py`` (metanetworks). The
exactness of the imported metanetwork against the authors' code: ``benchmarks/authors_exactness.py``.
"""
from __future__ import annotations

import argparse
import pickle  # only for its exception class: weights-only loading refuses a pickled module with it
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

_CHILD_FLAG = "--unpickle-in-child-process"
_PLAIN = (int, float, bool, str)


def _plain_payload(obj: Any) -> dict:
    """What the parent needs from an unpickled object, as plain tensors and numbers (``weights_only``-loadable)."""
    if isinstance(obj, Mapping):
        for key in ("model", "metanetwork", "state_dict", "net"):
            if isinstance(obj.get(key), (torch.nn.Module, Mapping)):
                return _plain_payload(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"kind": "state_dict", "class": None, "attributes": {},
                    "state_dict": {str(k): v.detach().cpu().clone() for k, v in obj.items()}}
    if isinstance(obj, torch.nn.Module):
        attributes = {k: v for k, v in vars(obj).items() if not k.startswith("_") and type(v) in _PLAIN}
        attributes.update({k: list(v) for k, v in vars(obj).items()
                           if not k.startswith("_") and isinstance(v, (list, tuple))
                           and all(type(x) in _PLAIN for x in v)})
        return {"kind": "module", "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
                "attributes": attributes,
                "modules": {name or "<root>": type(m).__name__ for name, m in obj.named_modules()},
                "state_dict": {k: v.detach().cpu().clone() for k, v in obj.state_dict().items()
                               if isinstance(v, torch.Tensor)}}
    return {"kind": "other", "class": f"{type(obj).__module__}.{type(obj).__qualname__}", "attributes": {},
            "state_dict": {}}


def _unpickle_in_this_process(code: str, source: str, target: str) -> int:
    """The child: make ``code`` the first place imports look (and drop this project's installed packages, whose
    names the authors' code reuses), unpickle ``source``, write its plain payload to ``target``."""
    sys.path.insert(0, str(Path(code).resolve()))
    sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    try:
        # THE unpickling of the project: runs code stored in `source` (see the module docstring)
        obj = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which names the file
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 3
    torch.save(_plain_payload(obj), target)
    return 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == _CHILD_FLAG:
    # The child process stops here, before any of this project's packages is imported.
    sys.exit(_unpickle_in_this_process(*sys.argv[2:]))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import MissingConfigException  # noqa: E402

from generate_dataset.models import build_model, load_model  # noqa: E402
from generate_dataset.models.authors import ExternalModelError, external_model  # noqa: E402
from nn.apply import load_metanetwork, save_metanetwork  # noqa: E402
from nn.authors import AuthorsMetanetworkError, import_authors_metanetwork  # noqa: E402
from nn.graph import GraphCodec, GraphCodecError  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.io import file_sha256, write_json  # noqa: E402

CONFIG_DIR = ROOT / "configs"
MODEL_FILE, METANETWORK_FILE = "model.pth", "metanetwork.pth"
RELEASE_FILES = {MODEL_FILE: "the network to prune (the authors' pretrain_final output)",
                 METANETWORK_FILE: "the meta-trained metanetwork (MyGNN)"}
# The authors' CIFAR graph layout (reference §4.2/4.3, §4.7.1): one padded 3x3 edge type, dense identity edges, the
# classifier decoded with their transposed reshape.
AUTHORS_CODEC = {"edge_layout": "padded", "identity_edges": "dense", "legacy_fc_permutation": True}


class ReleaseError(ValueError):
    """A release folder or file cannot be converted; the message names the file and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the files
# ----------------------------------------------------------------------------------------------------------------
def _unpickle_in_child(path: Path, code: Path, python: str | None = None) -> dict:
    """Unpickle ``path`` in a child process (``python``, default this interpreter; it needs only torch and what the
    pickle names) and return its plain payload, read weights-only."""
    with tempfile.TemporaryDirectory(prefix="convert_release_") as tmp:
        target = Path(tmp) / "payload.pt"
        done = subprocess.run([python or sys.executable, "-I", str(Path(__file__).resolve()), _CHILD_FLAG, str(code),
                               str(path), str(target)], capture_output=True, text=True)
        if done.returncode != 0 or not target.is_file():
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            hint = (" The pickle names classes of the authors' code: --code must be a checkout of "
                    "github.com/Yewei-Liu/MetaPruning (with nn/GNN.py, generate_dataset/resnet_family.py)."
                    if "No module named" in last or "Can't get attribute" in last else "")
            raise ReleaseError(f"{path}: unpickling it with --code {code} failed: {last}.{hint}")
        return torch.load(target, map_location="cpu", weights_only=True)


def read_file(path: Path, code: Path | None, trust_pickles: bool, python: str | None = None) -> dict:
    """The plain payload of one file: ``{"kind", "class", "attributes", "state_dict", "source", "sha256",
    "bytes"}``. A plain state dict loads weights-only; a pickled module only with ``trust_pickles`` and ``code``."""
    if not path.is_file():
        raise ReleaseError(f"{path}: no such file")
    info = {"source": str(path.resolve()), "sha256": file_sha256(path), "bytes": path.stat().st_size}
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights-only loading refused a pickled object
        if not trust_pickles:
            raise ReleaseError(
                f"{path} is a pickled Python object (torch.save of a whole module), not a plain state dict. Loading "
                "it runs code stored in the file. If you trust it (the authors' release), rerun with --trust-pickles "
                "and --code <checkout of github.com/Yewei-Liu/MetaPruning>: it is then unpickled in a child process "
                "of this script, the only place of the project that unpickles") from None
        if code is None or not Path(code).is_dir():
            raise ReleaseError(f"{path} is a pickled module whose classes live in the authors' code: pass --code "
                               f"<checkout of github.com/Yewei-Liu/MetaPruning> (got {code})") from None
        return {**_unpickle_in_child(path, Path(code), python), **info}
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ReleaseError(f"{path} cannot be read by torch.load ({first}); download or copy it again") from None
    return {**_plain_payload(loaded), **info}


# ----------------------------------------------------------------------------------------------------------------
# Converting
# ----------------------------------------------------------------------------------------------------------------
def compose_task(task: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``configs/main.yaml`` composed with ``task=<task>`` and ``overrides``."""
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("main", overrides=[f"task={task}", *overrides])
    except MissingConfigException:
        known = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
        raise ReleaseError(f"unknown task {task!r}; pass --task with one of {', '.join(known)}") from None


def _label(payload: dict) -> str:
    held = f", class {payload['class']}" if payload.get("class") else ""
    return f"{payload['source']}{held}"


def convert_model(payload: dict, task: Any) -> tuple[torch.nn.Module, dict, dict]:
    """``(model, spec, record)`` of a model payload for ``task`` (its ``task.model`` architecture)."""
    if payload["kind"] == "other":
        raise ReleaseError(f"{payload['source']} holds a {payload['class']}, expected the network to prune "
                           f"(a {task.model} module or state dict)")
    try:
        model, spec = external_model(task.model, payload["state_dict"], payload["source"], payload.get("class"))
    except ExternalModelError as err:
        raise ReleaseError(f"{err} (task {task.name})") from None
    record = {"source": payload["source"], "sha256": payload["sha256"], "bytes": payload["bytes"],
              "kind": payload["kind"], "class": payload.get("class"), "spec": spec,
              "key_mapping": "identity: the authors' and Torch-Pruning's keys are this project's "
                             "(generate_dataset/models/authors.py)"}
    return model, spec, record


def authors_codec(task: Any, num_classes: int, in_channels: int) -> GraphCodec:
    """The codec of ``task``'s unpruned model in the authors' CIFAR graph layout (:data:`AUTHORS_CODEC`)."""
    template = build_model(task.model, num_classes, in_channels=in_channels)
    try:
        return GraphCodec(template, input_shape=tuple(task.input_size), **AUTHORS_CODEC)
    except GraphCodecError as err:
        raise ReleaseError(f"task {task.name} ({task.model}): the authors' metanetworks of the quick-reproduce "
                           f"release use the CIFAR graph layout, which this architecture does not have: "
                           f"{err}") from None


def convert_metanetwork(payload: dict, task: Any, codec: GraphCodec, ratios: Mapping[str, float] | None = None):
    """``(metanetwork, options, record)`` of a metanetwork payload for ``task``'s graphs (``codec``)."""
    cls = (payload.get("class") or "").rpartition(".")[2]
    if cls and cls != "MyGNN":
        what = ("one of the authors' ImageNet metanetworks, trained on graphs this project's codec does not "
                "reproduce exactly (identity edges written (in, out), ViT bias layout)" if cls.startswith("MyGNN")
                else "not a metanetwork")
        raise ReleaseError(f"{_label(payload)}: expected the authors' MyGNN metanetwork (metanetwork.pth of a CIFAR "
                           f"reproduce folder), but this is {what}")
    attributes = {**payload.get("attributes", {}), **dict(ratios or {})}
    try:
        imported = import_authors_metanetwork(payload["state_dict"], codec.node_dim, codec.edge_dims, attributes,
                                              source=_label(payload), target=f"task {task.name} ({task.model})")
    except AuthorsMetanetworkError as err:
        raise ReleaseError(str(err)) from None
    net = imported.build()
    record = {"source": payload["source"], "sha256": payload["sha256"], "bytes": payload["bytes"],
              "kind": payload["kind"], "class": payload.get("class"), "options": imported.options,
              "sizes_read_from": "tensor shapes: hiddim/node_dim = nodeEnc.weight, edge sizes = edgeEnc*.weight "
                                 "columns, num_layer = convs.<l> indices",
              "residual_ratios_read_from": imported.ratio_sources,
              "renamed": imported.renamed, "dropped_keys": imported.dropped,
              "dropped_because": "MyGNN builds `mlps` but its forward never uses them",
              "layout": codec.layout}
    return net, imported.options, record


def _experiments_for(task: str) -> list[str]:
    """The ``configs/experiment`` rows that run ``pruning_final`` on ``task``."""
    rows = []
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        defaults = [d for d in data.get("defaults", []) if isinstance(d, dict)]
        if data.get("run") == "pruning_final" and {"override /task": task} in defaults:
            rows.append(path.stem)
    return rows


def final_commands(task: str, out: Path, with_metanetwork: bool) -> list[str]:
    model = f"final.model={out / 'model.pt'}"
    mn = (f"final.metanetwork={out / 'metanetwork.pt'} codec.legacy_fc_permutation=true" if with_metanetwork
          else "final.metanetwork=null")
    rows = _experiments_for(task)
    if not rows:
        return [f"python main/main.py run=pruning_final task={task} {model} {mn}"]
    return [f"python main/main.py -m experiment={row} protocol=paper {model} {mn}" for row in rows]


def _release_parts(release: Path) -> tuple[str | None, str | None, str | None]:
    """(task, method, reproduce folder) from ``.../final/<task>/<method>/reproduce_<k>``."""
    parts = release.resolve().parts
    if len(parts) >= 3 and parts[-1].startswith("reproduce_"):
        return parts[-3], parts[-2], parts[-1]
    return None, None, None


def convert_release(release: Path, code: Path | None, trust_pickles: bool, task_name: str | None = None,
                    out: Path | None = None, overrides: tuple[str, ...] = (), epoch: int = 0,
                    ratios: Mapping[str, float] | None = None, python: str | None = None) -> dict:
    """Convert one ``reproduce_<k>`` folder (module docstring); returns the ``conversion.json`` content."""
    release = Path(release)
    if not release.is_dir():
        raise ReleaseError(f"{release}: no such folder; expected a reproduce folder of the authors' release, "
                           "final/<task>/<method>/reproduce_<k>/ with model.pth and metanetwork.pth")
    missing = [name for name in RELEASE_FILES if not (release / name).is_file()]
    if missing:
        found = sorted(p.name for p in release.iterdir()) or ["nothing"]
        expected = "; ".join(f"{name}: {what}" for name, what in RELEASE_FILES.items())
        raise ReleaseError(f"{release}: missing {', '.join(str(release / m) for m in missing)}. A reproduce folder "
                           f"of the authors' release (download.zip, final/<task>/<method>/reproduce_<k>/) holds "
                           f"{expected}; found {', '.join(found)}")
    path_task, method, folder = _release_parts(release)
    task_name = task_name or path_task
    if not task_name:
        raise ReleaseError(f"{release}: cannot tell the task from the path (not final/<task>/<method>/reproduce_<k>); "
                           "pass --task, e.g. --task resnet56_on_CIFAR10")
    cfg = compose_task(task_name, overrides)
    task = cfg.task
    if out is None:
        out = Path(cfg.paths.output_dir) / "authors_release" / task.name / (method or "release") / (folder or "0")
    out = Path(out)

    model_payload = read_file(release / MODEL_FILE, code, trust_pickles, python)
    model, spec, model_record = convert_model(model_payload, task)
    mn_payload = read_file(release / METANETWORK_FILE, code, trust_pickles, python)
    codec = authors_codec(task, spec["num_classes"], spec["in_channels"])
    net, options, mn_record = convert_metanetwork(mn_payload, task, codec, ratios)

    out.mkdir(parents=True, exist_ok=True)
    source = {k: model_record[k] for k in ("source", "sha256", "class")}
    save_checkpoint(out / "model.pt", model.state_dict(), spec, source=source)
    source = {k: mn_record[k] for k in ("source", "sha256", "class")}
    save_metanetwork(out / "metanetwork.pt", net, codec, options, task=task.name, epoch=epoch, source=source,
                     dropped_keys=mn_record["dropped_keys"])
    # the files load with the loaders a final run uses, and the metanetwork only with the authors' layout
    load_model(out / "model.pt")
    load_metanetwork(out / "metanetwork.pt", codec)

    record = {"script": "main/convert_release.py", "task": task.name, "release": str(release.resolve()),
              "code": str(Path(code).resolve()) if code else None, "unpickled": trust_pickles and any(
                  p["kind"] != "state_dict" for p in (model_payload, mn_payload)),
              "epoch_recorded": epoch,
              "epoch_note": "the release does not say which meta-training epoch metanetwork.pth is",
              "files": {"model.pt": model_record, "metanetwork.pt": mn_record},
              "final_runs": final_commands(task.name, out, True),
              "baseline_runs": final_commands(task.name, out, False), "out": str(out.resolve())}
    write_json(out / "conversion.json", record)
    return record


def convert_model_file(path: Path, task_name: str, out: Path | None = None,
                       overrides: tuple[str, ...] = ()) -> dict:
    """Convert a weights-only state dict (e.g. Torch-Pruning's base model) into ``model.pt`` (nothing unpickled)."""
    cfg = compose_task(task_name, overrides)
    out = Path(out) if out is not None else Path(cfg.paths.output_dir) / "external" / cfg.task.name / Path(path).stem
    payload = read_file(Path(path), None, trust_pickles=False)
    model, spec, model_record = convert_model(payload, cfg.task)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", model.state_dict(), spec,
                    source={k: model_record[k] for k in ("source", "sha256", "class")})
    load_model(out / "model.pt")
    record = {"script": "main/convert_release.py", "task": cfg.task.name, "files": {"model.pt": model_record},
              "unpickled": False, "baseline_runs": final_commands(cfg.task.name, out, False),
              "out": str(out.resolve())}
    write_json(out / "conversion.json", record)
    return record


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release", nargs="?", type=Path,
                        help="a reproduce folder of the authors' release: final/<task>/<method>/reproduce_<k>")
    parser.add_argument("--model-file", type=Path, default=None,
                        help="instead: one weights-only state dict (e.g. Torch-Pruning's cifar10_resnet56.pth)")
    parser.add_argument("--code", type=Path, default=None,
                        help="checkout of github.com/Yewei-Liu/MetaPruning (the classes the pickles name)")
    parser.add_argument("--trust-pickles", action="store_true",
                        help="allow unpickling the release's files (runs code stored in them; see the docstring)")
    parser.add_argument("--python", default=None,
                        help="interpreter of the unpickling child (default: this one); e.g. an environment with the "
                             "authors' torch / torch_geometric versions if the pickles do not load with these")
    parser.add_argument("--task", default=None, help="configs/task name (default: <task> of the release path)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: see the docstring)")
    parser.add_argument("--epoch", type=int, default=0, help="meta-training epoch to record (unknown: 0)")
    parser.add_argument("--node-res-ratio", type=float, default=None,
                        help="only for a metanetwork saved as a bare state dict (MyGNN keeps it as an attribute)")
    parser.add_argument("--edge-res-ratio", type=float, default=None, help="likewise")
    parser.add_argument("--override", action="append", default=[],
                        help="extra Hydra override of the composed config (repeatable), e.g. task.model=resnet8")
    args = parser.parse_args(argv)
    if (args.release is None) == (args.model_file is None):
        parser.error("give a release folder or --model-file (one of the two)")
    if args.model_file is not None and args.task is None:
        parser.error("--model-file needs --task")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.model_file is not None:
            record = convert_model_file(args.model_file, args.task, args.out, tuple(args.override))
        else:
            ratios = {k: v for k, v in (("node_res_ratio", args.node_res_ratio),
                                        ("edge_res_ratio", args.edge_res_ratio)) if v is not None}
            if args.trust_pickles:
                print("note: --trust-pickles: unpickling the release's files runs code stored in them; this script "
                      "does it in a child process with --code first on its import path", file=sys.stderr)
            record = convert_release(args.release, args.code, args.trust_pickles, args.task, args.out,
                                     tuple(args.override), args.epoch, ratios, args.python)
    except (ReleaseError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written to {record['out']}")
    for name, info in record["files"].items():
        print(f"{name}: from {info['source']} (sha256 {info['sha256']})")
        if info.get("dropped_keys"):
            print(f"  dropped (unused by MyGNN's forward): {', '.join(info['dropped_keys'])}")
    print("final runs:" if "final_runs" in record else "final runs (baseline without metanetwork):")
    for line in record.get("final_runs", record["baseline_runs"]):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
