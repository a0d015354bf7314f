from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastwsss.config import (
    Config,
    ConfigError,
    _leaves,
    _yaml_layers,
    config_purpose,
    load_config,
    packaged_configs,
    resume_changes,
    schema,
    to_yaml,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
SCRATCH = "model.pretrained=none"  # the paper configs require a weights file (or none, on purpose)


def test_all_configs_present():
    assert {p.stem for p in CONFIGS} >= {"demo", "voc_toco", "voc_mcc", "coco_toco", "coco_mcc"}


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_list(value) else value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_yaml_loads_and_starts_with_a_comment(path):
    cfg = load_config(path, [SCRATCH])
    assert cfg.name == path.stem
    assert path.read_text().startswith("#"), "each YAML starts with what it reproduces and how to run it"
    # a YAML holds only differences from what it starts from (the schema, and its base: chain)
    layers = _yaml_layers(path)
    below = OmegaConf.merge(OmegaConf.structured(schema()), *(layer for layer, _ in layers[:-1]))
    own = layers[-1][0]
    same = [key for key, _ in _leaves(own) if _plain(OmegaConf.select(below, key)) == _plain(OmegaConf.select(own, key))]
    assert not same, f"{path.name} restates what it starts from: {same}"


def test_paper_settings():
    voc = load_config(CONFIGS[0].parent / "voc_mcc.yaml", [SCRATCH])
    coco = load_config(CONFIGS[0].parent / "coco_toco.yaml", [SCRATCH])
    assert (voc.train.max_iters, voc.train.batch_size, voc.data.crop_size, voc.optim.lr) == (20000, 4, 448, 6e-5)
    assert (voc.loss.w_aff, voc.loss.w_con, voc.loss.w_seg, voc.loss.w_reg, voc.loss.seg_start) == (0.2, 0.5, 0.1, 0.05, 2001)
    assert voc.model.backbone == "deit_base_patch16_224" and voc.model.freeze_pos_embed
    assert (coco.train.max_iters, coco.train.batch_size, coco.data.num_classes) == (80000, 8, 81)
    assert (coco.cam.high_thresh, coco.cam.low_thresh, coco.cam.bkg_thresh) == (0.65, 0.25, 0.45)
    assert (coco.loss.seg_start, coco.loss.aff_start, coco.loss.con_start, coco.loss.temperature) == (8001, 12001, 12001, 1.0)


def test_typo_is_rejected_with_full_key_path(tmp_path):
    with pytest.raises(ConfigError, match="data.roott"):
        load_config(None, ["data.roott=/x"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depht: 3\n")
    with pytest.raises(ConfigError, match=r"model\.depht[\s\S]*bad\.yaml|bad\.yaml[\s\S]*model\.depht"):
        load_config(bad)


def test_wrong_type_and_bad_choice_are_rejected():
    with pytest.raises(ConfigError, match="train.max_iters"):
        load_config(None, ["train.max_iters=many"])
    with pytest.raises(ConfigError, match="data.dataset='vok'[\\s\\S]*train.method='tocoo'"):
        load_config(None, ["train.method=tocoo", "data.dataset=vok"])  # every problem at once
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_iters"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")


def test_overrides_win_and_yaml_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "demo.yaml", ["train.max_iters=7", "data.rescale_range=[0.5,1.0]"])
    assert cfg.train.max_iters == 7 and tuple(cfg.data.rescale_range) == (0.5, 1.0)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg


def test_base_layers_one_yaml_on_another(tmp_path):
    cam, demo = load_config(CONFIGS[0].parent / "demo_cam.yaml"), load_config(CONFIGS[0].parent / "demo.yaml")
    assert (demo.train.method, cam.train.method) == ("mcc", "cam")
    assert (cam.data, cam.model, cam.cam, cam.optim) == (demo.data, demo.model, demo.cam, demo.optim)
    assert cam.name == "demo_cam" != demo.name
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")


def test_packaged_configs_are_the_repository_configs():
    packaged = packaged_configs()
    assert list(packaged) == [p.stem for p in CONFIGS]  # configs/ is mapped into the package: one copy
    for path in CONFIGS:
        assert packaged[path.stem].read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_first_line_says_what_the_config_reproduces(path):
    purpose = config_purpose(path)  # --help lists it, so it must stand alone
    assert purpose and purpose.endswith("."), f"{path.name}: the first line is one complete sentence, got {purpose!r}"
    assert f"--config {path.stem}" in path.read_text() or path.stem == "demo", "the Run: line uses the name"


def test_config_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    by_path = load_config(CONFIGS[0].parent / "voc_mcc.yaml", ["train.max_iters=5", SCRATCH])
    assert load_config("voc_mcc", ["train.max_iters=5", SCRATCH]) == by_path
    assert load_config("voc_mcc.yaml", ["train.max_iters=5", SCRATCH]) == by_path
    assert load_config("demo_cam").train.method == "cam"  # its `base: demo.yaml` resolves inside the package
    with pytest.raises(ConfigError, match=r"not found: voc_mcx.*nor a packaged config: [a-z_, ]*coco_mcc, .*voc_toco"):
        load_config("voc_mcx")
    with pytest.raises(ConfigError, match="not found"):
        load_config("elsewhere/voc_mcc.yaml")  # a path that names a packaged file is still a path


def test_a_local_file_wins_over_a_packaged_name_and_may_start_from_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("name: my_demo\n")
    assert load_config("demo.yaml").name == "my_demo"
    assert load_config("demo").name == "demo"  # a bare name that is no file here is the packaged config
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("base: voc_mcc.yaml\nname: mine\ntrain:\n  max_iters: 9\n"
                                                "model:\n  pretrained: none\n")
    cfg = load_config(tmp_path / "sub" / "mine.yaml")
    assert (cfg.name, cfg.train.method, cfg.train.max_iters) == ("mine", "mcc", 9)
    (tmp_path / "sub" / "voc_mcc.yaml").write_text("name: sibling\n")  # a file beside it wins over the package
    assert load_config(tmp_path / "sub" / "mine.yaml").train.method == "cam"


@pytest.mark.parametrize("name", ["voc_toco", "voc_mcc", "coco_toco", "coco_mcc"])
def test_paper_configs_refuse_to_start_without_pretrained_weights(name, tmp_path):
    with pytest.raises(ConfigError, match=r"fine-tunes pretrained weights.*deit_base_patch16_224\.fb_in1k.*"
                                          r"model\.pretrained=none"):
        load_config(name)
    assert load_config(name, ["model.pretrained=/w/deit.pth"]).model.pretrained == "/w/deit.pth"
    assert load_config(name, [SCRATCH]).model.pretrained == "none"
    own = tmp_path / "own.yaml"  # a config of one's own that starts from a paper config must set it too
    own.write_text(f"base: {name}.yaml\nname: own\n")
    with pytest.raises(ConfigError, match="fine-tunes pretrained weights"):
        load_config(own)


def test_check_weights_reports_how_a_file_maps_onto_the_backbone(tmp_path):
    import subprocess
    import sys

    import torch

    from fastwsss.models import create_vit

    vit = create_vit("deit_tiny_patch16_224", img_size=96, patch_size=8, embed_dim=96, depth=4, num_heads=3)
    weights = vit.state_dict()
    weights.pop("blocks.3.mlp.fc2.bias")
    weights["head.weight"] = torch.zeros(3)
    weights["pos_embed"] = torch.zeros(1, 1 + 7 * 7, 96)  # another grid: resampled
    torch.save(weights, tmp_path / "w.pth")
    proc = subprocess.run([sys.executable, "-m", "fastwsss.train", "--config", "demo", f"model.pretrained={tmp_path}/w.pth",
                           "--check-weights"], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "MISSING (left at random init): 1: blocks.3.mlp.fc2.bias" in proc.stdout
    assert "UNEXPECTED (ignored): 1: head.weight" in proc.stdout and "resized: 1: pos_embed" in proc.stdout
    assert not (tmp_path / "runs").exists()  # trains nothing


# ---- what a resume may change


def test_resume_changes_allowed_and_refused():
    saved = load_config("demo")
    assert resume_changes(saved, load_config("demo")) == ([], [])
    allowed, refused = resume_changes(saved, load_config("demo", [
        "train.log_interval=7", "run.tensorboard=true", "train.eval_interval=9", "eval.max_images=3",
        "train.ckpt_interval=11", "train.device=cpu", "data.num_workers=1", "infer.scales=[1.0]", "train.stop_at=5",
        "run.dir=/elsewhere", "kernels.backend=torch", "data.root=/moved"]))
    assert refused == []
    assert "train.log_interval: 50 -> 7" in allowed and "run.tensorboard: false -> true" in allowed
    assert "infer.scales: [1.0, 1.5, 1.25] -> [1.0]" in allowed and "train.stop_at: null -> 5" in allowed
    assert "kernels.backend: auto -> torch" in allowed and len(allowed) == 12, allowed
    changes = ["train.method=toco", "optim.lr=0.001", "train.precision=bf16", "model.embed_dim=48",
               "model.pretrained=w.pth", "contrast.num_local=3", "train.max_iters=100", "train.batch_size=8",
               "train.seed=1", "train.grad_accum=2", "data.crop_size=64", "quirks.flip_box=true", "loss.w_con=0.1",
               "cam.high_thresh=0.6", "data.labels=l.csv", "data.synthetic.num_train=5", "toco.crop_size=32"]
    allowed, refused = resume_changes(saved, load_config("demo", [*changes, "train.log_interval=7"]))
    assert allowed == ["train.log_interval: 50 -> 7"]
    assert [line.split(":", 1)[0] for line in refused] == sorted(
        (c.split("=", 1)[0] for c in changes), key=list(_leaf_keys(saved)).index)
    assert "optim.lr: 0.0005 -> 0.001" in refused and "train.precision: auto -> bf16" in refused
    allowed, refused = resume_changes(saved, load_config("demo", [*changes, "run.allow_changes=true"]))
    assert refused == [] and "optim.lr: 0.0005 -> 0.001 (run.allow_changes)" in allowed
    assert "run.allow_changes: false -> true" in allowed


def _leaf_keys(cfg):
    from fastwsss.config import leaf_values

    return leaf_values(cfg)


def test_resume_changes_cover_every_setting_and_new_sections():
    """Every leaf, changed alone, is either allowed or refused (never missed); a section added to the tree later (a
    method's own) is covered without being listed, and refused."""
    import dataclasses

    saved = Config()
    for key, value in _leaf_keys(saved).items():
        new = Config()
        *path, name = key.split(".")
        node = new
        for part in path:
            node = getattr(node, part)
        other = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float))
                 else [*value, value[-1]] if isinstance(value, list) else "changed")
        setattr(node, name, tuple(other) if isinstance(other, list) else other)
        allowed, refused = resume_changes(saved, new)
        assert len(allowed) + len(refused) == 1 and (allowed + refused)[0].startswith(f"{key}: "), key

    @dataclasses.dataclass
    class NewMethodConfig:
        crop: int = 96

    @dataclasses.dataclass
    class WithMethod(Config):
        newmethod: NewMethodConfig = dataclasses.field(default_factory=NewMethodConfig)

    changed = WithMethod()
    changed.newmethod.crop = 64
    assert resume_changes(WithMethod(), changed) == ([], ["newmethod.crop: 96 -> 64"])

