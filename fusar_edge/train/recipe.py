"""The seeds' two-stage SFT recipe (FUSAR-GPT ``train_tlm.py``), plus a stage 0 for the demo.

- **stage 0** (ours, for a model trained from scratch): full training of a preset (ViT, LLM and
  TLM MLP together) on the captions and the tasks. A random base has nothing for LoRA to adapt,
  so the demo gets this first; a real Qwen2.5-VL base skips it. Saves the base model as a
  Hugging Face folder (``base/``) and its TLM (``vec64_film.pt`` + ``tlm_config.json``). With
  ``--dense-truth`` the visual tokens also get a per-token loss from the generator's ground
  truth (a warm-up on it alone first; ``train.dense``): a from-scratch ViT needs it to see the
  small targets at all.
- **stage 1** (knowledge injection): LoRA r 8, alpha 32, dropout 0.05 on every language-model
  q/k/v/o/gate/up/down linear (listed by full module name, vision tower excluded, as
  ``train_tlm.py`` does) + the TLM MLP; reference defaults 30 epochs, lr 1e-4. The TLM starts
  from ``--init-tlm`` when given (the demo continues stage 0's), else fresh.
- **stage 2** (tasks): the same LoRA continued (``--init-adapter``), TLM frozen; reference
  defaults 5 epochs, lr 1e-5. With ``--grasp`` (GRASP's recipe: the backbone frozen up to the
  LoRA, the region prompts and the W_q / W_k projections learned), GRASP is added fresh and
  trained with the LoRA; its weights are saved beside the adapter (``grasp.safetensors`` +
  ``grasp_config.json``, see ``model.grasp_checkpoint``) and ``import-fusar-gpt`` turns it on.

Stages 1 and 2 save the **reference checkpoint layout** into ``OUT``: the PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``), ``vec64_film.pt``
(``{"film_mlp": state_dict}``) and ``tlm_config.json``, plus the tokenizer, so
``fusar-edge import-fusar-gpt BASE OUT OUT --out BUNDLE`` imports our own training output.
``--no-aef`` trains the same recipe without anchors or TLM (the paper's ablation); its
checkpoints hold no TLM files.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends.torch_stages import resolve_device
from ..config import DEMO_VOCAB_SIZE, FusarConfig, GRASPConfig, TLMConfig, load_backbone_json, preset
from ..errors import InputError
from ..fsutil import write_text_atomic
from ..geo.chip import to_chip
from ..geo.sar import read_sar
from ..model.bundle import build_random, load_backbone
from ..model.fusar import FusarModel
from ..model.grasp_checkpoint import save_grasp
from ..model.import_fusar_gpt import TLM_FORMAT, read_film_state, read_tlm_config
from ..tokenizer import TextTokenizer
from .dense import DenseHead, DenseSettings, DenseTargets, flip_image, load_truth, warmup
from .loop import TrainSettings, train
from .samples import SampleBuilder, read_manifest

LORA_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = {0: {"epochs": 10.0, "lr": 1e-3}, 1: {"epochs": 30.0, "lr": 1e-4}, 2: {"epochs": 5.0, "lr": 1e-5}}


@dataclass
class StageArgs:
    stage: int
    data: list[str]
    out: Path
    preset: str = "demo"
    base: Path | None = None
    init_adapter: Path | None = None
    init_tlm: Path | None = None
    no_aef: bool = False
    sigma: float = 2.0
    grasp: GRASPConfig | None = None  # stage 2 only: train GRASP (enabled) with the LoRA
    max_length: int = 2048
    settings: TrainSettings | None = None
    dense: DenseSettings | None = None  # stage 0 only: dense supervision of the visual tokens
    freeze_vision: bool = False  # stage 0 only: the main loop keeps the warmed-up vision tower as it is
    device: str = "cpu"  # where the model trains (auto, cpu, cuda, cuda:N); the weights are saved from the CPU


def lora_targets(backbone) -> list[str]:
    """Full names of the language model's linears (train_tlm.py's list)."""
    targets = [n for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)
               and n.endswith(LORA_SUFFIXES) and "visual" not in n.split(".")]
    if not targets:
        raise InputError("no language-model linear to put LoRA on (is BASE a Qwen2.5-VL model?)")
    return targets


def _config_for_base(base: Path, chip: int, tlm: bool, sigma: float, hidden_mult: int = 4) -> FusarConfig:
    return FusarConfig(name=f"trained:{base.name}", backbone=load_backbone_json(base / "config.json"), chip_size=chip,
                       tlm=TLMConfig(enabled=tlm, sigma=sigma, hidden_mult=hidden_mult),
                       grasp=GRASPConfig(enabled=False), prompt_style="reference")


def _require_files(flag: str, folder: Path, names: tuple[str, ...], what: str) -> None:
    """One line, before anything loads, when ``folder`` is not the kind of folder ``flag`` wants."""
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: not a directory (expected {what})")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{flag} {folder}: no {missing[0]} (expected {what})")


def _rows(data: list[str], need_aef: bool = True) -> list[dict]:
    rows = []
    for path in data:
        rows += read_manifest(path, need_aef=need_aef)
    return rows


def run_stage(args: StageArgs, show_progress: bool = True) -> dict:
    """Run one stage; writes its outputs into ``args.out`` atomically (checkpoints live there meanwhile)."""
    if args.stage not in (0, 1, 2):
        raise InputError(f"--stage: expected 0, 1 or 2, got {args.stage}")
    if args.grasp is not None and args.stage != 2:
        raise InputError(f"--grasp: GRASP trains in stage 2 (with the task data), not stage {args.stage}")
    if args.dense is not None and args.stage != 0:
        raise InputError(f"--dense-truth: dense supervision trains the vision tower in stage 0, not stage {args.stage}")
    if args.dense is not None:
        args.dense.check()
    device, _ = resolve_device(args.device, torch.float32)  # a bad --device fails before anything loads
    settings = args.settings or TrainSettings(**DEFAULTS[args.stage])
    rows = _rows(args.data, need_aef=not args.no_aef)
    chip = rows[0].get("coordinate_size", 504)
    out = Path(args.out)
    peft_model = None
    if args.stage == 0:
        cfg = preset(args.preset)
        if cfg.chip_size != chip:
            raise InputError(f"{args.data[0]}: coordinate_size {chip}, but preset {args.preset!r} has chip "
                             f"{cfg.chip_size} (make the data with --chip {cfg.chip_size})")
        cfg.tlm.enabled = not args.no_aef
        cfg.grasp.enabled = False
        cfg.tlm.sigma = args.sigma
        model = build_random(cfg, seed=settings.seed)
        # the demo vocabulary (demo, demo-wide) or the tiny one
        tok = TextTokenizer.demo() if cfg.text["vocab_size"] == DEMO_VOCAB_SIZE else TextTokenizer.tiny()
        # --freeze-vision: the main loop's answer loss moved the warmed-up tokens away from what the
        # dense head reads (eval-demo-recipes-vm.md, "the main loop that undoes the warm-up")
        frozen = {id(p) for p in model.visual.parameters()} if args.freeze_vision else set()
        params = {n: p for n, p in model.named_parameters() if id(p) not in frozen}
    else:
        if args.base is None:
            raise InputError("--base: stages 1 and 2 need the base model folder (stage 0's OUT/base, or a "
                             "Qwen2.5-VL checkpoint)")
        base = Path(args.base)
        _require_files("--base", base, ("config.json", "tokenizer.json"), "stage 0's OUT/base or a Qwen2.5-VL checkpoint")
        if args.stage == 2:
            if args.init_adapter is None:
                raise InputError("--init-adapter: stage 2 continues stage 1's LoRA (its OUT directory)")
            _require_files("--init-adapter", Path(args.init_adapter), ("adapter_config.json",), "stage 1's OUT directory")
        if args.init_tlm is not None and args.stage == 1:
            _require_files("--init-tlm", Path(args.init_tlm), ("vec64_film.pt",), "a stage's OUT directory")
        tok = TextTokenizer.from_file(base / "tokenizer.json")
        tlm_dir = args.init_adapter if args.stage == 2 else args.init_tlm
        tlm_cfg = None if args.no_aef or tlm_dir is None else read_tlm_config(Path(tlm_dir), None)
        sigma = float(tlm_cfg["sigma"]) if tlm_cfg else args.sigma
        cfg = _config_for_base(base, chip, not args.no_aef, sigma)
        if args.grasp is not None:
            cfg.grasp = args.grasp
        backbone = load_backbone(base, dtype=torch.float32)
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model

        if args.stage == 1:
            lora = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=lora_targets(backbone), r=8,
                              lora_alpha=32, lora_dropout=0.05, bias="none")
            peft_model = get_peft_model(backbone, lora)  # LoRA layers go into backbone in place
        else:
            if args.init_adapter is None:
                raise InputError("--init-adapter: stage 2 continues stage 1's LoRA (its OUT directory)")
            peft_model = PeftModel.from_pretrained(backbone, str(args.init_adapter), is_trainable=True)
        torch.manual_seed(settings.seed)  # a new GRASP's initial prompts and projections
        model = FusarModel(cfg, backbone=peft_model.get_base_model())
        if model.tlm is not None and tlm_dir is not None:
            model.tlm.film_mlp.load_state_dict(read_film_state(Path(tlm_dir)))
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        if args.stage == 1 and model.tlm is not None:
            params.update({n: p for n, p in model.named_parameters() if n.startswith("tlm.")})
        if model.grasp is not None:
            params.update({n: p for n, p in model.named_parameters() if n.startswith("grasp.")})
    model.to(device)  # built on the CPU whatever the device: the initial weights do not depend on its RNG
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    builder = SampleBuilder(cfg, tok, max_length=args.max_length, use_anchors=not args.no_aef)
    dense = None
    if args.dense is not None:
        dense = DenseHead(cfg.hidden_size, args.dense.pos_weight,
                          position_grid=cfg.token_grid if args.dense.position else None,
                          density_weight=args.dense.density, image_count_weight=args.dense.image_count,
                          digits_weight=args.dense.digits).to(device)
        targets = DenseTargets(load_truth(args.dense.truth), chip, cfg.token_grid, args.dense.digit_labels)
        params.update({f"dense_head.{n}": p for n, p in dense.named_parameters()})
    checking = rows
    if show_progress:  # reading every image and anchor set takes a while on a large dataset (~30 s on synth16k): say so
        from tqdm import tqdm

        checking = tqdm(rows, desc="checking rows", unit="row", file=sys.stderr, dynamic_ncols=True, leave=False)
    for row in checking:  # every row is checked (length, files, truth) before the first step, not hours later
        builder.check(row)
        if dense is not None:
            targets(row)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    aux, warm = None, None
    if dense is not None:
        warm = _dense_warmup(model, dense, rows, builder, targets, args.dense, settings.seed, out, show_progress)
        weight = args.dense.weight
        aux = (lambda visual, row: weight * dense.loss(visual, targets(row))) if weight > 0 else None
    log_path = out / "train_log.jsonl"
    logged = _logged_steps(log_path)

    def log_step(entry: dict, log) -> None:
        # a resumed run replays the steps after its checkpoint, bit for bit: log each step once
        if entry["step"] > logged:
            log.write(json.dumps(entry) + "\n")

    with log_path.open("a", encoding="utf-8") as log:
        result = train(model, params, rows, builder, settings, out, show_progress,
                       log=lambda e: log_step(e, log), aux=aux)
    model.to("cpu")  # saved tensors load anywhere (no cuda: storages in vec64_film.pt)
    _save(args, model, tok, peft_model, out)
    summary = {"stage": args.stage, "rows": len(rows), "data": [str(d) for d in args.data],
               "grasp": (f"trained: grid {list(cfg.grasp.grid)}, k {cfg.grasp.k}, prompt_len {cfg.grasp.prompt_len}"
                         if model.grasp is not None else "off"),
               "trainable_parameters": sum(p.numel() for p in params.values()), "no_aef": args.no_aef,
               "dense": vars(args.dense) | {"truth": str(args.dense.truth), "warmup": warm} if args.dense else None,
               "settings": vars(settings), **{k: v for k, v in result.items() if k != "history"},
               "final_loss": result["history"][-1]["loss"] if result["history"] else None}
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _logged_steps(path: Path) -> int:
    """The last step ``train_log.jsonl`` holds (0 for none); a line cut by a kill is dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    whole = []
    for line in lines:
        try:
            whole.append((json.loads(line)["step"], line))
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # the torn last line of a killed run, and anything after it
    if len(whole) != len(lines) or (lines and not lines[-1].endswith("\n")):
        whole = [(s, ln) for s, ln in whole if ln.endswith("\n")]
        write_text_atomic(path, "".join(ln for _, ln in whole))
    return int(whole[-1][0]) if whole else 0


def _dense_warmup(model, head, rows, builder, targets, dense: DenseSettings, seed: int, out: Path,
                  show_progress: bool) -> dict | None:
    """The vision tower's warm-up on the dense loss; its result is kept in ``OUT/dense-warmup.pt``
    (written atomically), so a resumed run does not repeat it. -> steps, seconds, losses."""
    if dense.warmup_epochs <= 0:
        return None
    done = out / "dense-warmup.pt"
    modules = {"visual": model.visual, "head": head, **({"tlm": model.tlm} if model.tlm is not None else {})}
    first_rows = first_row_per_image(rows)
    seen = {_image_key(row) for row in first_rows}
    run_id = json.dumps({"images": sorted(map(str, seen)), "epochs": dense.warmup_epochs, "lr": dense.warmup_lr,
                         "batch": dense.batch, "seed": seed, "modules": sorted(modules)}
                        | ({"augment": "flips"} if dense.augment else {})  # old warm-ups keep their id
                        | ({"pos_weight": dense.pos_weight} if dense.pos_weight != 1.0 else {})
                        | ({"position": True} if dense.position else {})
                        | ({"density": dense.density} if dense.density else {})
                        | ({"image_count": dense.image_count} if dense.image_count else {})
                        | ({"digits": dense.digits} if dense.digits else {})
                        | ({"digit_labels": sorted(dense.digit_labels)} if dense.digit_labels else {}))
    if done.is_file():
        saved = torch.load(done, map_location="cpu", weights_only=True)
        if saved.get("run_id") != run_id:
            raise InputError(f"{done}: the warm-up of a different run (other data or settings); remove it or choose "
                             "another --out")
        for name, module in modules.items():
            module.load_state_dict(saved[name])
        return {k: saved[k].tolist() for k in ("steps", "seconds", "first_loss", "final_loss") if k in saved}
    t0 = time.perf_counter()
    images = _WarmupImages(first_rows, builder, targets)  # read as drawn: memory does not grow with the data
    augment = None
    if dense.augment:
        cfg = model.config

        def augment(i: int, flip: int) -> tuple:
            if flip == 0:
                return images[i]
            row = first_rows[i]
            chip = to_chip(read_sar(Path(row["_root"]) / row["image"]), cfg.chip_size)
            return flip_image(chip, builder.anchors(row), targets.truth[str(row["scene"])], flip, cfg,
                              targets.digit_labels)

    losses = warmup(model, head, images, dense.warmup_epochs, dense.warmup_lr, dense.batch, seed, show_progress,
                    augment=augment)
    report = {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 1), "first_loss": losses[0],
              "final_loss": losses[-1]}
    tmp = out / "dense-warmup.pt.tmp"
    torch.save({name: m.state_dict() for name, m in modules.items()} | {"losses": torch.tensor(losses)}
               | {k: torch.tensor(v) for k, v in report.items()} | {"run_id": run_id}, tmp)
    tmp.replace(done)
    return report


def _image_key(row: dict) -> tuple:
    return (row["_root"], row["image"], row.get("aef"))


def first_row_per_image(rows: list[dict]) -> list[dict]:
    """The first row of each distinct image (and anchor set), in order: the warm-up's images."""
    seen, first = set(), []
    for row in rows:
        if _image_key(row) not in seen:
            seen.add(_image_key(row))
            first.append(row)
    return first


class _WarmupImages:
    """The warm-up's images as a sequence: ``(pixels, grid_thw, anchors or None, cell labels)`` of
    the i-th distinct image, read when asked (the builder keeps the recent ones)."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, targets: DenseTargets):
        self.rows, self.builder, self.targets = rows, builder, targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple:
        row = self.rows[i]
        return (*self.builder.image_inputs(row), self.targets(row))


def _save(args: StageArgs, model: FusarModel, tok: TextTokenizer, peft_model, out: Path) -> None:
    """The stage's outputs, each written to a temporary name first and moved into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        if args.stage == 0:
            model.backbone.save_pretrained(tmp / "base", safe_serialization=True)
            tok.save(tmp / "base")
        else:
            peft_model.save_pretrained(str(tmp))
            tok.save(tmp)
        if model.grasp is not None:
            save_grasp(model.grasp, model.config.grasp, model.config.hidden_size, tmp)
        if model.tlm is not None:
            torch.save({"film_mlp": model.tlm.film_mlp.state_dict()}, tmp / "vec64_film.pt")
            cfg = model.config
            (tmp / "tlm_config.json").write_text(json.dumps(
                {"format": TLM_FORMAT, "sigma": cfg.tlm.sigma, "hidden_mult": cfg.tlm.hidden_mult,
                 "image_size": cfg.chip_size, "vec_dim": 64}, indent=2), encoding="utf-8")
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
