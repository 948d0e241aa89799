"""The catalogue commands as a user runs them: tables, JSON records, exit codes."""

from __future__ import annotations

import json

import yaml

from conftest import brainzoo, clone_main, fixture_card, fixture_spec, write_index, write_version

RECIPE_WEIGHTS = {
    "name": "model", "path": "weights/model.h5",
    "upstream": {"url": "https://example.org/checkpoint.p", "license": "MIT"},
    "recipe": {"argv": ["brainzoo", "convert", "--arch", "sfcn", "{src}", "weights/model.h5"],
               "options": {"src": {"type": "path", "help": "the upstream checkpoint"}}},
}


def json_records(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def add_unconverted_version(root):
    spec, card = fixture_spec(), fixture_card()
    spec.update(id="neuronets/toy-age/1.0.0", model="toy-age", version="1.0.0", task="brain-age", weights=[RECIPE_WEIGHTS])
    spec["inference"].update(method="whole-volume", output={"type": "age"})
    spec["architecture"] = {"builder": "sfcn", "options": {}}  # what the recipe's --arch sfcn fills
    card["Model_details"]["Model_version"] = "1.0.0"
    write_version(root, spec, card)
    write_index(root)


def test_list_shows_presence_and_versions_to_convert(toy_dataset, tmp_path):
    add_unconverted_version(toy_dataset)
    table = brainzoo("list", cwd=toy_dataset)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "TASK", "CONTRAST"]
    assert any("neuronets/toy/0.1.0" in line and "1/1 present" in line for line in lines)
    assert any("neuronets/toy-age/1.0.0" in line and "0/0 present, 1 to convert" in line for line in lines)
    records = {r["id"]: r for r in json_records(brainzoo("list", "--json", cwd=toy_dataset))}
    assert records["neuronets/toy/0.1.0"]["weights_bytes"] == 4096


def test_list_marks_each_models_recommended_version_and_a_bare_model_name_means_it(toy_dataset):
    spec, card = fixture_spec(), fixture_card()
    spec.update(id="neuronets/toy/0.2.0", version="0.2.0")
    card["Model_details"]["Model_version"] = "0.2.0"
    write_version(toy_dataset, spec, card)
    write_index(toy_dataset)
    index = yaml.safe_load((toy_dataset / "spec.yaml").read_text())
    for entry in index["catalogue"]:
        entry["recommended"] = entry["id"] == "neuronets/toy/0.1.0"
    (toy_dataset / "spec.yaml").write_text(yaml.safe_dump(index, sort_keys=False))
    table = brainzoo("list", cwd=toy_dataset).stdout.splitlines()
    assert table[0].split()[-1] == "RECOMMENDED"
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["neuronets/toy/0.1.0"][-1] == "yes" and rows["neuronets/toy/0.2.0"][-1] != "yes"
    records = {r["id"]: r for r in json_records(brainzoo("list", "--json", cwd=toy_dataset))}
    assert records["neuronets/toy/0.1.0"]["recommended"] is True
    assert records["neuronets/toy/0.2.0"]["recommended"] is False
    [record] = json_records(brainzoo("info", "toy", "--json", cwd=toy_dataset))
    assert record["id"] == "neuronets/toy/0.1.0" and record["recommended"] is True
    for entry in index["catalogue"]:
        entry.pop("recommended")
    (toy_dataset / "spec.yaml").write_text(yaml.safe_dump(index, sort_keys=False))
    unmarked = brainzoo("info", "toy", cwd=toy_dataset)
    assert unmarked.returncode == 1 and "neuronets/toy: the index marks no recommended version" in unmarked.stderr


def test_info_reports_spec_card_and_presence(toy_dataset):
    [record] = json_records(brainzoo("info", "toy/0.1.0", "--json", cwd=toy_dataset))
    assert record["id"] == "neuronets/toy/0.1.0"
    assert record["weights"][0]["present"] is True
    assert record["license"]["weights"] == "MIT"
    unknown = brainzoo("info", "neuronets/nope/1.0.0", cwd=toy_dataset)
    assert unknown.returncode == 1 and "neuronets/nope/1.0.0: no such model version" in unknown.stderr


def test_get_explains_how_to_obtain_unconverted_weights(toy_dataset):
    add_unconverted_version(toy_dataset)
    got = brainzoo("get", "neuronets/toy-age/1.0.0", "--json", cwd=toy_dataset)
    [record] = [r for r in json_records(got) if r["action"] == "get"]
    assert record["status"] == "impossible"
    # Neither the file's name nor its bytes are known: it is named by its entry, and converted unverified.
    assert record["message"].endswith("then run: brainzoo get neuronets/toy-age/1.0.0 --allow-unverified "
                                      "--upstream model=CHECKPOINT")
    assert "https://example.org/checkpoint.p" in record["message"]


def test_get_sets_up_a_clone_nobody_bootstrapped(toy_dataset, tmp_path):
    clone = clone_main(toy_dataset, tmp_path / "clone")
    got = brainzoo("get", "neuronets/toy/0.1.0", "--json", cwd=clone)
    assert got.returncode == 0, got.stdout
    assert [r["action"] for r in json_records(got)][-1] == "get"
    assert (clone / "neuronets/toy/0.1.0/weights/model.h5").is_file()


def test_spec_round_trips_through_yaml(toy_dataset):
    spec = yaml.safe_load((toy_dataset / "neuronets/toy/0.1.0/spec.yaml").read_text())
    assert spec["weights"][0]["size"] == 4096 and len(spec["weights"][0]["sha256"]) == 64


def test_convert_refuses_a_wrong_number_of_paths(tmp_path):
    proc = brainzoo("convert", "--arch", "sfcn", str(tmp_path / "only.h5"), cwd=tmp_path)
    assert proc.returncode == 1 and "--arch sfcn takes SRC DST, got 1 path(s)" in proc.stderr
    proc = brainzoo("convert", "--arch", "sfcn", str(tmp_path / "missing.p"), str(tmp_path / "out.h5"), cwd=tmp_path)
    assert proc.returncode == 1 and "missing.p" in proc.stderr
    assert not (tmp_path / "out.h5").exists()
