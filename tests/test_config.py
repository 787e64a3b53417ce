"""params.yaml validation: a bad value fails before any compute, with a message naming the key."""
import copy

import pytest
import yaml

from trainability import config

PARAMS = yaml.safe_load(open("params.yaml"))


def _broken(path, value):
    p = copy.deepcopy(PARAMS)
    node = p
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return p


def test_repository_params_are_valid():
    config.validate_params(copy.deepcopy(PARAMS))


@pytest.mark.parametrize("path, value, named", [
    (["run_defaults", "optim", "lr"], -1.0, "run_defaults.optim.lr"),
    (["run_defaults", "optim", "lr"], "fast", "run_defaults.optim.lr"),
    (["run_defaults", "batch_size"], 1, "run_defaults.batch_size"),
    (["run_defaults", "model", "activation"], "gelu", "run_defaults.model.activation"),
    (["run_defaults", "scheduler", "cool"], 1.5, "run_defaults.scheduler.cool"),
    (["families", "l2", "regularizer", "kind"], "l1", "families.l2.regularizer.kind"),
    (["runs", "l2-vanilla", "arm"], "sometimes", "runs.l2-vanilla.arm"),
    (["runs", "l2-vanilla", "extends"], "l1", "runs.l2-vanilla.extends"),
    (["scales", "smoke", "seeds"], [], "scales.smoke.seeds"),
    (["run_defaults", "optim", "learning_rate"], 1e-3, "run_defaults.optim"),  # unknown key
    (["run_defaults", "n_tasks"], 3.0, "run_defaults.n_tasks"),                # whole-number float
    (["run_defaults", "stream", "n_images"], 70000, "run_defaults.stream.n_images"),
    (["scales", "smoke", "run", "stream", "n_images"], 100, "stream.n_images"),   # below batch_size
    (["scales", "smoke", "experiments"], ["fig5", "nope"], "scales.smoke.experiments"),
])
def test_invalid_value_names_the_key(path, value, named):
    with pytest.raises(config.ConfigError) as e:
        config.validate_params(_broken(path, value))
    assert named in str(e.value)


def test_unknown_run_in_experiment_is_named():
    p = copy.deepcopy(PARAMS)
    p["experiments"]["fig5"]["runs"].append("nope")
    with pytest.raises(config.ConfigError, match=r"experiments\.fig5\.runs.*nope"):
        config.validate_params(p)


def test_unknown_scale_is_named():
    with pytest.raises(config.ConfigError, match="scale"):
        config.validate_params(_broken(["scale"], "huge"))


def test_resolution_order_and_seed():
    cfg = config.resolve_run(PARAMS, "smoke", "crelu-scheduled", seed=3)
    assert cfg["seed"] == 3
    assert cfg["model"]["activation"] == "crelu" and cfg["optim"]["lr"] == 1e-2   # run override
    assert cfg["n_tasks"] == PARAMS["scales"]["smoke"]["run"]["n_tasks"]           # scale override
    assert cfg["optim"]["betas"] == [0.9, 0.999]                                   # default
    assert cfg["arm"] == "scheduled"


def test_set_dotted_and_hash():
    cfg = config.resolve_run(PARAMS, "smoke", "l2-vanilla", seed=0)
    cfg2 = config.set_dotted(cfg, "optim.lr=3e-4")
    assert cfg2["optim"]["lr"] == 3e-4 and cfg["optim"]["lr"] == 1e-3
    assert config.config_hash(cfg) != config.config_hash(cfg2)
    cfg3 = config.set_dotted(cfg, "wandb.mode=disabled")
    assert config.config_hash(cfg) == config.config_hash(cfg3)   # logging does not change the science
    with pytest.raises(config.ConfigError, match="optim.lr"):
        config.validate_run(config.set_dotted(cfg, "optim.lr=0"))


def test_snakemake_validation_names_the_key():
    """The same schema through Snakemake's own validator (what the Snakefile calls)."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate
    validate(copy.deepcopy(PARAMS), str(config.SCHEMA_PATH))
    with pytest.raises(WorkflowError, match="lr"):
        validate(_broken(["run_defaults", "optim", "lr"], -1.0), str(config.SCHEMA_PATH))


def test_dvc_yaml_is_generated_from_params():
    from trainability.pipeline import main
    assert main(["dvc-yaml", "--check"]) == 0, "run: python -m trainability.pipeline dvc-yaml"


def test_a_run_entry_changes_that_run_only_and_a_family_all_its_runs():
    p = copy.deepcopy(PARAMS)
    p["runs"]["l2-vanilla"]["optim"] = {"lr": 3e-4}
    assert config.resolve_run(p, "smoke", "l2-vanilla", 0)["optim"]["lr"] == 3e-4
    assert config.resolve_run(p, "smoke", "l2-scheduled", 0) == config.resolve_run(PARAMS, "smoke", "l2-scheduled", 0)
    p["families"]["l2"]["regularizer"]["lam"] = 1e-2
    assert config.resolve_run(p, "smoke", "l2-scheduled", 0)["regularizer"] == {"kind": "l2", "lam": 1e-2}
    assert "extends" not in config.resolve_run(p, "smoke", "l2-scheduled", 0)


def test_a_scales_family_refinement_comes_after_the_family_and_before_the_run():
    """scales.<s>.families (issue 35): at the paper scale the scheduled arms run the authors' per-method
    bound; Eq. 2 as written (*-eq2) is spelled out in its run entry, so it is the paper's at every scale."""
    p = config.validate_params(copy.deepcopy(PARAMS))
    paper = {r: config.resolve_run(p, "paper", r, 0)["scheduler"] for r in ("crelu-scheduled", "l2-long", "wass-eq2")}
    assert (paper["crelu-scheduled"]["statistic"], paper["crelu-scheduled"]["beta"]) == ("sq_dev", 20.0)
    assert paper["l2-long"]["statistic"] == "lam_bar" and paper["l2-long"]["code_alpha_agg"] is True
    for scale in p["scales"]:
        eq2 = config.resolve_run(p, scale, "wass-eq2", 0)["scheduler"]
        assert (eq2["statistic"], eq2["beta"], eq2["code_alpha_agg"]) == ("vol", 1.0, False), scale
    assert config.resolve_run(p, "default", "crelu-scheduled", 0)["scheduler"]["statistic"] == "vol"
    q = _broken(["scales", "default", "families"], {"crelu": {"optim": {"lr": 5e-3}}})
    assert config.resolve_run(q, "default", "crelu-scheduled", 0)["optim"]["lr"] == 5e-3
    assert config.resolve_run(q, "default", "relu-vanilla", 0)["optim"]["lr"] == 1e-3   # no family: untouched
    with pytest.raises(config.ConfigError, match="scales.default.families.gelu: unknown family"):
        config.validate_params(_broken(["scales", "default", "families"], {"gelu": {}}))


def test_skip_runs_leave_a_run_out_of_a_scales_experiments():
    p = config.validate_params(copy.deepcopy(PARAMS))
    assert "crelu-eq2" in config.experiment_runs(p, "paper", "fig5")
    assert "crelu-eq2" not in config.experiment_runs(p, "default", "fig5")
    assert "crelu-eq2" not in config.run_names(p, "default") and "crelu-eq2" in config.run_names(p, "paper")
    with pytest.raises(config.ConfigError, match="scales.smoke.skip_runs: unknown run 'nope'"):
        config.validate_params(_broken(["scales", "smoke", "skip_runs"], ["nope"]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused(value):
    """YAML has .nan and .inf, JSON Schema's ranges let NaN through (NaN <= 0 is false): refused by name."""
    with pytest.raises(config.ConfigError, match=r"run_defaults\.optim\.lr: .* is not a finite number"):
        config.validate_params(_broken(["run_defaults", "optim", "lr"], value))


def test_nan_in_params_yaml_and_in_set_is_refused(tmp_path):
    text = open("params.yaml").read().replace("optim: {lr: 1.0e-3,", "optim: {lr: .nan,")
    assert ".nan" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(config.ConfigError, match="run_defaults.optim.lr"):
        config.load_params(tmp_path / "params.yaml")
    for value in ("nan", ".nan", ".inf", "-.inf"):
        with pytest.raises(config.ConfigError, match="optim.lr"):
            config.resolve_with_sets(PARAMS, "smoke", "l2-vanilla", 0, [f"optim.lr={value}"])


def test_set_reads_exponent_numbers_and_keeps_quoted_strings():
    cfg = config.resolve_run(PARAMS, "smoke", "l2-vanilla", seed=0)
    assert config.set_dotted(cfg, "optim.lr=3e-4")["optim"]["lr"] == 3e-4     # YAML 1.1 reads a string
    assert config.set_dotted(cfg, "optim.betas=[0.9, 1e-3]")["optim"]["betas"] == [0.9, 1e-3]
    named = config.resolve_with_sets(PARAMS, "smoke", "l2-vanilla", 0, ['wandb.name="1e3"'])
    assert named["wandb"]["name"] == "1e3"
    assert config.set_dotted(cfg, "wandb.name='my run'")["wandb"]["name"] == "my run"
    assert config.set_dotted(cfg, "wandb.name=abc")["wandb"]["name"] == "abc"


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    (tmp_path / "params.yaml").write_text("scale: smoke\nruns:\n  a: {lr: [1, 2}\n")
    with pytest.raises(config.ConfigError, match=r"params.yaml is not valid YAML at line 3, column \d+"):
        config.load_params(tmp_path / "params.yaml")
