"""`brainzoo validate`: passes on good catalogues, and names the file and field of each problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from brainzoo.spec import Inference, Training
from brainzoo.validate import (conversion_record_problems, spec_problems, training_data_problems, validate,
                               version_problems)
from conftest import REPO, brainzoo, fixture_card, fixture_spec, write_index, write_version

TOY = "neuronets/toy/0.1.0"


def problems(root) -> str:
    return "\n".join(r["message"] for r in validate(root) if r["status"] == "error")


def edit_yaml(path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def catalogue(toy_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(toy_dataset, copy, symlinks=True)
    return copy


def test_the_repository_catalogue_is_valid():
    result = brainzoo("validate", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_toy_catalogue_is_valid(catalogue):
    assert problems(catalogue) == ""


@pytest.mark.parametrize("file, change, expected", [
    ("model_card.yaml", lambda c: c.pop("Ethical_considerations"),
     f"{TOY}/model_card.yaml: (top level): 'Ethical_considerations' is a required property"),
    ("model_card.yaml", lambda c: c["Model_details"].update(Model_version="0.2.0"),
     f"{TOY}/model_card.yaml: Model_details.Model_version: '0.2.0' does not match the folder semver '0.1.0'"),
    ("spec.yaml", lambda s: s.update(version="1.0.0"),
     f"{TOY}/spec.yaml: version: '1.0.0' does not match the folder (expected '0.1.0')"),
    ("spec.yaml", lambda s: s["weights"][0].pop("sha256"),
     f"{TOY}/spec.yaml: weights[0]: a weights entry needs sha256 + size + sources (published)"),
    ("spec.yaml", lambda s: s["weights"][0].update(path="../../other/weights/model.h5"),
     f"{TOY}/spec.yaml: weights[0].path: path '../../other/weights/model.h5' escapes the version folder"),
    ("spec.yaml", lambda s: s["weights"][0].update(path="/etc/passwd"),
     f"{TOY}/spec.yaml: weights[0].path: path '/etc/passwd' escapes the version folder"),
    ("spec.yaml", lambda s: s["weights"][0].update(sha256="a" * 64),
     f"{TOY}/spec.yaml: weights[0].sha256: annexed key SHA256E-s4096--"),
    ("spec.yaml", lambda s: s["inference"]["entry_point"]["argv"].append("{gpu}"),
     f"{TOY}/spec.yaml: inference.entry_point.argv[9]: placeholder {{gpu}} is not declared in options"),
    ("spec.yaml", lambda s: s["inference"]["entry_point"].update(argv=["python3 predict.py {infile}"]),
     f"{TOY}/spec.yaml: inference.entry_point.argv[0]: 'python3 predict.py {{infile}}' does not match"),
    ("spec.yaml", lambda s: s["inference"]["preprocessing"].append({"step": "zscore", "over": "nonzero"}),
     f"{TOY}/spec.yaml: inference.preprocessing: preprocessing step 'zscore': unknown option(s) over"),
    ("spec.yaml", lambda s: s["inference"]["entry_point"]["options"]["threshold"].update(default="half"),
     f"{TOY}/spec.yaml: inference.entry_point.options.threshold.default: 'half' is not of type float"),
    ("spec.yaml", lambda s: s["inference"].update(method="deepbet"),
     f"{TOY}/spec.yaml: inference.deepbet: a deepbet spec needs this block"),
    ("spec.yaml", lambda s: s["inference"].update(deepbet={"bbox_margin": 0.1}),
     f"{TOY}/spec.yaml: inference.deepbet: only a spec whose inference.method is deepbet"),
    ("spec.yaml", lambda s: s["inference"].update(method="sliding-window"),
     f"{TOY}/spec.yaml: inference.method: 'sliding-window' is no runner's (known: blocks, deepbet, whole-volume, "
     "generation)"),
    ("spec.yaml", lambda s: s["inference"].update(method="whole-volume"),
     f"{TOY}/spec.yaml: inference.method: whole-volume runs brain-age, age-group, sex-classification models, not a "
     "brain-extraction model"),
    ("spec.yaml", lambda s: s["inference"].pop("method"),
     f"{TOY}/spec.yaml: inference: 'method' is a required property"),
])
def test_each_problem_names_file_and_field(catalogue, file, change, expected):
    edit_yaml(catalogue / TOY / file, change)
    assert expected in problems(catalogue)
    assert brainzoo("validate", cwd=catalogue).returncode == 1


def test_malformed_yaml_is_named(catalogue):
    (catalogue / TOY / "spec.yaml").write_text("id: [unclosed\n")
    assert f"{catalogue / TOY / 'spec.yaml'}: malformed YAML" in problems(catalogue)


def test_weights_committed_to_git_instead_of_annexed(catalogue):
    weights = catalogue / TOY / "weights/model.h5"
    content = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(content)
    assert "weights/model.h5 is not an annexed file" in problems(catalogue)


def test_index_must_list_every_version_with_its_task(catalogue):
    edit_yaml(catalogue / "spec.yaml", lambda i: i["catalogue"][0].update(task="brain-age"))
    assert "spec.yaml: catalogue[0].task: 'brain-age' but the spec says 'brain-extraction'" in problems(catalogue)
    edit_yaml(catalogue / "spec.yaml", lambda i: i.update(catalogue=[]))
    assert f"spec.yaml: catalogue: version {TOY} is not listed" in problems(catalogue)


STAGE = {"name": "stage1", "init": "scratch", "data": {"records": "records/train", "blocks": "random 16^3 blocks"},
         "command": ["brainzoo", "train", TOY, "--train", "records/train", "--out", "runs/stage1"],
         "metrics": "runs/stage1-metrics.json"}


def test_each_training_stage_has_its_metrics_file_and_starts_from_an_earlier_stage(catalogue):
    second = dict(STAGE, name="stage2", init="stage1", metrics="runs/stage2-metrics.json")
    edit_yaml(catalogue / TOY / "spec.yaml", lambda s: s.update(training={"stages": [STAGE, second]}))
    (catalogue / TOY / "runs").mkdir()
    (catalogue / TOY / "runs/stage1-metrics.json").write_text("{}")
    assert problems(catalogue) == (f"{TOY}/spec.yaml: training.stages[1].metrics: runs/stage2-metrics.json is not a "
                                   "file in the version folder")
    assert brainzoo("validate", cwd=catalogue).returncode == 1
    (catalogue / TOY / "runs/stage2-metrics.json").write_text("{}")
    assert problems(catalogue) == ""
    edit_yaml(catalogue / TOY / "spec.yaml", lambda s: s["training"]["stages"].reverse())
    assert (f"{TOY}/spec.yaml: training.stages[0].init: 'stage1' is neither scratch nor an earlier stage"
            in problems(catalogue))
    edit_yaml(catalogue / TOY / "spec.yaml", lambda s: s["training"]["stages"][0].update(metrics="../../x.json"))
    assert f"{TOY}/spec.yaml: training.stages[0].metrics: ../../x.json is not a file in the version folder" in problems(
        catalogue)
    edit_yaml(catalogue / TOY / "spec.yaml", lambda s: s["training"]["stages"][0].pop("command"))
    assert (f"{TOY}/spec.yaml: training.stages[0]: 'command' is a required property" in problems(catalogue))


def test_each_model_has_exactly_one_recommended_version(catalogue):
    spec, card = fixture_spec(), fixture_card()
    spec.update(id="neuronets/toy/0.2.0", version="0.2.0")
    card["Model_details"]["Model_version"] = "0.2.0"
    write_version(catalogue, spec, card)
    write_index(catalogue)  # 0.2.0, the newest, is recommended
    assert "recommended" not in problems(catalogue)
    edit_yaml(catalogue / "spec.yaml", lambda i: [e.update(recommended=True) for e in i["catalogue"]])
    assert "spec.yaml: catalogue: model toy: 2 versions are marked recommended (0.1.0, 0.2.0); mark one" in problems(
        catalogue)
    assert brainzoo("validate", cwd=catalogue).returncode == 1
    edit_yaml(catalogue / "spec.yaml", lambda i: [e.pop("recommended") for e in i["catalogue"]])
    assert "spec.yaml: catalogue: model toy: no version is marked recommended: true" in problems(catalogue)


def test_a_recommended_version_is_marked_on_every_variant(catalogue):
    shutil.move(catalogue / TOY, catalogue / "variant")
    for variant in ("a", "b"):
        shutil.copytree(catalogue / "variant", catalogue / TOY / variant, symlinks=True)
        edit_yaml(catalogue / TOY / variant / "spec.yaml", lambda s: s.update(id=f"{TOY}/{variant}", variant=variant))
    shutil.rmtree(catalogue / "variant")
    write_index(catalogue)
    assert "recommended" not in problems(catalogue)
    edit_yaml(catalogue / "spec.yaml", lambda i: i["catalogue"][1].pop("recommended"))
    assert (f"spec.yaml: catalogue: model toy: version 0.1.0 is recommended, but not on {TOY}/b (mark every variant "
            "of it)") in problems(catalogue)


def test_unpublished_weights_need_upstream_and_recipe(catalogue):
    def to_recipe(spec):
        spec["architecture"] = {"builder": "sfcn", "options": {}}
        spec["weights"][0] = {
            "name": "model", "path": "weights/model.h5",
            "upstream": {"url": "https://example.org/model.p", "license": "MIT"},
            "recipe": {"argv": ["brainzoo", "convert", "--arch", "sfcn", "{src}", "weights/model.h5"],
                       "options": {"src": {"type": "path", "help": "upstream checkpoint"}}}}
    edit_yaml(catalogue / TOY / "spec.yaml", to_recipe)
    assert problems(catalogue) == ""
    edit_yaml(catalogue / TOY / "spec.yaml", lambda s: s["weights"][0].pop("upstream"))
    assert "weights[0]: a weights entry needs sha256 + size + sources" in problems(catalogue)



@pytest.mark.parametrize("arch, problem", [
    ("warp", "--arch warp: no checkpoint converter of that name (known: sfcn, densenet169"),
    ("deepbet-bbox", "--arch deepbet-bbox: no checkpoint converter of that name"),
    ("densenet169", "--arch densenet169 fills a densenet169_3d network, but the spec's architecture is sfcn"),
])
def test_a_recipe_names_a_registered_converter_of_the_specs_architecture(catalogue, arch, problem):
    def to_recipe(spec):
        spec["architecture"] = {"builder": "sfcn", "options": {}}
        spec["weights"][0] = {
            "name": "model", "path": "weights/model.h5",
            "upstream": {"url": "https://example.org/model.p", "license": "MIT"},
            "recipe": {"argv": ["brainzoo", "convert", "--arch", arch, "model.p", "weights/model.h5"], "options": {}}}
    edit_yaml(catalogue / TOY / "spec.yaml", to_recipe)
    assert f"{TOY}/spec.yaml: weights[0].recipe.argv: {problem}" in problems(catalogue)


def test_conversion_records_must_match_the_schema_and_the_weights(tmp_path):
    """The deepbet version's records, as `brainzoo convert --record` wrote them, checked against its spec."""
    deepbet = REPO / "neuronets" / "deepbet" / "1.0.2"
    spec = yaml.safe_load((deepbet / "spec.yaml").read_text())
    shutil.copytree(deepbet / "conversion", tmp_path / "conversion")
    assert list(conversion_record_problems(spec, tmp_path)) == []
    record_file = tmp_path / "conversion" / "bbox.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "keras_model": {**record["keras_model"], "sha256": "0" * 64}}))
    assert any(f"conversion/bbox.json records sha256 {'0' * 64} for bbox.h5; the weights entry says" in p
               for p in conversion_record_problems(spec, tmp_path))
    record_file.write_text(json.dumps({key: value for key, value in record.items() if key != "self_check"}))
    assert ["conversion.records[0]: conversion/bbox.json: (top level): 'self_check' is a required property"] == \
        list(conversion_record_problems(spec, tmp_path))
    record_file.unlink()
    assert list(conversion_record_problems(spec, tmp_path)) == [
        "conversion.records[0]: conversion/bbox.json is not a file in the version folder"]


@pytest.mark.parametrize("change, problem", [
    (lambda s: s.update(weights=5), "weights: 5 is not of type 'array'"),
    (lambda s: s["weights"][0].update(path="../../outside.h5"), "weights[0].path: path '../../outside.h5' escapes"),
    (lambda s: s["inference"].pop("output"), "inference: 'output' is a required property"),
    (lambda s: s["inference"]["preprocessing"].append({"step": "warp-drive"}), "step: 'warp-drive' is not one of"),
])
def test_an_unusable_spec_is_an_error_record_and_the_rest_of_the_catalogue_works(catalogue, change, problem):
    """One broken version stops neither list, verify, bootstrap nor validate; using it is a clear error."""
    good = "neuronets/toy-copy/0.1.0"
    shutil.copytree(catalogue / TOY, catalogue / good, symlinks=True)
    edit_yaml(catalogue / good / "spec.yaml", lambda s: s.update(id=good, model="toy-copy"))
    edit_yaml(catalogue / TOY / "spec.yaml", change)
    for command in ("list", "verify", "bootstrap", "validate"):
        result = brainzoo(command, "--json", cwd=catalogue)
        records = [yaml.safe_load(line) for line in result.stdout.splitlines()]
        assert result.returncode == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert any(r["status"] == "error" and problem in r["message"] for r in records), (command, records)
        assert any(r["status"] != "error" and good in str(r.get("id") or r.get("path")) for r in records) or \
            command != "list", (command, records)
    for command in (("info", TOY), ("get", TOY), ("predict", "brain-mask", "scan.nii.gz", "m.nii.gz", "--model", TOY)):
        result = brainzoo(*command, cwd=catalogue)
        assert result.returncode == 1 and "Traceback" not in result.stderr and "unusable spec" in result.stderr, command


def test_a_model_folder_outside_the_dataset_is_an_error(catalogue, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(catalogue / TOY, outside, symlinks=True)
    result = brainzoo("info", str(outside), cwd=catalogue)
    assert result.returncode == 1 and "is not inside the dataset" in result.stderr and "Traceback" not in result.stderr


DENSENET = "neuronets/flair-brainage-densenet169/1.0.0/flair"


def copied_version(version_id: str, root: Path) -> Path:
    """The catalogue version's spec and card, alone in a version folder under ``root``."""
    version = root / version_id
    version.mkdir(parents=True)
    for name in ("spec.yaml", "model_card.yaml"):
        shutil.copy(REPO / version_id / name, version / name)
    return version


def test_an_architecture_option_the_builder_does_not_take_is_named(tmp_path):
    """A depth or width option is the builder's own (test_training_inputs shrinks networks with them); a misspelt
    one is named with those the builder takes, instead of a TypeError when the network is built to explain it."""
    version = copied_version(DENSENET, tmp_path)
    edit_yaml(version / "spec.yaml",
              lambda s: s["architecture"]["options"].update(block_layers=[1, 1, 1, 1], growth=4))
    assert [p for p in version_problems(version, tmp_path) if "architecture" in p] == [
        f"{DENSENET}/spec.yaml: architecture.options: densenet169_3d takes no option growth (it takes block_layers, "
        "dropout, growth_rate, input_shape, n_outputs, stem_features)"]


@pytest.mark.parametrize("training, problem", [
    ({"select": {"monitor": "val_dice"}},
     "training.select.monitor: 'val_dice' is not a validation value of loss mse (val_loss or val_mae)"),
    ({"early_stopping": {"monitor": "val_mea", "patience": 20}},
     "training.early_stopping.monitor: 'val_mea' is not a validation value of loss mse (val_loss or val_mae)"),
    ({"select": {"metric": "val_mae", "mode": "min"}},
     "training.select: Additional properties are not allowed ('metric', 'mode' were unexpected)"),
])
def test_a_monitor_is_a_value_that_validation_reports(training, problem, tmp_path):
    """select (which epoch's weights a run keeps) and early_stopping watch val_loss or the loss's metric; a misspelt
    name would never select or stop."""
    version = copied_version(DENSENET, tmp_path)
    edit_yaml(version / "spec.yaml", lambda s: s["training"].update(select={"monitor": "val_loss"}))
    assert not [p for p in version_problems(version, tmp_path) if "training" in p]
    edit_yaml(version / "spec.yaml", lambda s: s["training"].update(training))
    assert [p for p in version_problems(version, tmp_path) if "training" in p] == [f"{DENSENET}/spec.yaml: {problem}"]


SFCN = "neuronets/sfcn-ukbiobank/1.0.0"


def converted_to(**keras_model) -> dict:
    """What `get --upstream` adds to a weights entry, its record's Keras model changed (deepbet's record, reused)."""
    record = json.loads((REPO / "neuronets" / "deepbet" / "1.0.2" / "conversion" / "bbox.json").read_text())
    record["keras_model"].update(keras_model)
    return {"size": 1, "sha256": "0" * 64, "conversion": record}


@pytest.mark.parametrize("change, problem", [
    (lambda s: s["architecture"]["options"].update(n_bins=40),
     "architecture.options: n_bins follow(s) from inference.output"),
    (lambda s: s["training"]["loss"].update(bins={"start": 42, "stop": 82, "step": 1}),
     "training.loss.bins: the soft labels lie on inference.output.bins"),
    (lambda s: s["inference"]["output"]["bins"].update(step=3), "inference.output.bins: "),
    (lambda s: s["inference"]["output"].pop("bins"), "inference.output.bins: an age-log-probabilities output"),
    (lambda s: s["weights"][0].update(converted_to(output_shapes={"log_probabilities": [20]})),
     "weights[0] (weights/model.h5), its conversion record: the network gives 20 values, but inference.output.bins "
     "has 40"),
])
def test_the_age_bins_are_said_once_and_soundly(change, problem):
    """The bins live in inference.output alone: a second copy (the head's n_bins, the loss's bins) could disagree."""
    spec = yaml.safe_load((REPO / SFCN / "spec.yaml").read_text())
    assert not list(spec_problems(spec, Path(SFCN) / "spec.yaml", REPO / SFCN))
    change(spec)
    assert any(problem in p for p in spec_problems(spec, Path(SFCN) / "spec.yaml", REPO / SFCN))


@pytest.mark.parametrize("normalization, where", [
    ("divide-by-maen", "training.data.normalization"),
    ([{"step": "zscore"}, {"step": "min-max"}], "training.data.normalization[1]"),
])
def test_a_misspelt_training_normalisation_is_named_with_the_allowed_steps(normalization, where):
    """The allowed names are the training pipeline's, taken from the inference steps: written once, not in the schema."""
    spec = yaml.safe_load((REPO / SFCN / "spec.yaml").read_text())
    spec["training"]["data"]["normalization"] = normalization
    wrong = normalization if isinstance(normalization, str) else normalization[1]["step"]
    [problem] = training_data_problems(Inference.from_spec(spec["inference"]),
                                       Training.from_spec(spec["training"]))
    assert problem.startswith(f"{where}: {wrong!r} is not one of zscore, divide-by-mean, minmax, percentile (")
