"""ifa-serve's version loading under hostile conditions: failed loads retried by directory
content with back-off, version names beyond int64."""

import logging
import os
import shutil
import time

import pytest

from ifa_tf import export
from ifa_tf.serving import rest
from ifa_tf.serving.model_manager import ModelConfig, ModelManager, State
from test_serving_config import SCHEMA, tiny_model  # noqa: F401 (a fixture used by name)


@pytest.fixture(scope="module")
def good_version(tiny_model, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """A complete exported version directory, copied into each test's base path."""
    base = tmp_path_factory.mktemp("export")
    return export.export_saved_model(tiny_model, base, schema=SCHEMA, warmup_shapes=())


def manager_for(base, poll_wait_seconds=0.01, **kwargs):
    """A manager the test polls by hand (`poll()`, never `start()`, so no polling thread)."""
    return ModelManager([ModelConfig("m", str(base))], poll_wait_seconds, **kwargs)


def states(manager):
    return {version: (state, message) for version, state, message in manager.status("m")}


def poll_until(manager, condition, polls=5, pause=0.05):
    for _ in range(polls):
        manager.poll()
        if condition():
            return True
        time.sleep(pause)
    return False


def served_version(manager):
    return manager.resolve("m").version


# ------------------------------------------------------------------------- version loading
def test_a_failed_version_replaced_in_place_is_loaded(good_version, tmp_path):
    """Defect 2: a truncated version 3, then a good version 3 renamed into its place."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base, max_load_retries=0)
    manager.poll()
    shutil.copytree(good_version, base / "3")
    pb = base / "3" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:100])
    manager.poll()
    assert served_version(manager) == 1
    assert states(manager)[3][0] == State.END
    assert "Failed to load servable version 3" in states(manager)[3][1]
    shutil.rmtree(base / "3")
    shutil.copytree(good_version, tmp_path / "staging")
    os.rename(tmp_path / "staging", base / "3")
    assert poll_until(manager, lambda: states(manager)[3][0] == State.AVAILABLE)
    assert served_version(manager) == 3
    assert states(manager)[3] == (State.AVAILABLE, "")
    assert states(manager)[1] == (State.END, "")


def test_a_version_whose_files_arrive_late_loads_once_they_are_complete(good_version,
                                                                        tmp_path):
    """Defect 2: a slow non-atomic copy; the load fails until saved_model.pb arrives, long
    after the retries ran out."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base, max_load_retries=1)
    manager.poll()
    (base / "2").mkdir()
    shutil.copytree(os.path.join(good_version, "variables"), base / "2" / "variables")
    for _ in range(4):  # the first load and its one retry fail; then it is left alone
        time.sleep(0.05)
        manager.poll()
    assert served_version(manager) == 1
    assert states(manager)[2][0] == State.END
    for name in sorted(os.listdir(good_version)):
        source = os.path.join(good_version, name)
        if os.path.isfile(source):
            shutil.copy2(source, base / "2" / name)
        elif name != "variables":
            shutil.copytree(source, base / "2" / name)
    assert poll_until(manager, lambda: served_version(manager) == 2)
    assert states(manager)[2] == (State.AVAILABLE, "")


def test_a_broken_version_is_retried_with_back_off_then_left_alone(good_version, tmp_path,
                                                                   caplog):
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base, poll_wait_seconds=0.1, max_load_retries=4,
                          load_retry_interval_seconds=0.4)
    manager.poll()
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    with caplog.at_level(logging.ERROR, logger="ifa_serve"):
        deadline = time.monotonic() + 2.5  # the four retries are due by 0.1 + 0.2 + 0.4 + 0.4 s
        while time.monotonic() < deadline:
            manager.poll()
            time.sleep(0.02)
    failures = [record for record in caplog.records
                if "Failed to load servable version 2 of m" in record.getMessage()]
    assert len(failures) == 5  # the load and max_load_retries retries
    waits = ("retry 1 of 4 in 0.1s", "retry 2 of 4 in 0.2s", "retry 3 of 4 in 0.4s",
             "retry 4 of 4 in 0.4s", "no retries left")
    for record, wait in zip(failures, waits):
        assert wait in record.getMessage()
    gaps = [later.created - earlier.created for earlier, later in zip(failures, failures[1:])]
    for gap, wait in zip(gaps, (0.1, 0.2, 0.4, 0.4)):
        assert gap >= wait - 0.01, gaps
    assert served_version(manager) == 1
    assert states(manager)[2][0] == State.END


def test_version_names_follow_tf_serving_rules(good_version, tmp_path, caplog):
    """Defect 3: a loadable SavedModel named 99999999999999999999 must not become latest;
    a zero-padded name is its number, loaded from that directory."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "0002")
    huge = "99999999999999999999"
    shutil.copytree(good_version, base / huge)
    manager = manager_for(base)
    with caplog.at_level(logging.WARNING, logger="ifa_serve"):
        manager.poll()
        manager.poll()
        manager.poll()
    assert served_version(manager) == 2
    assert manager.resolve("m").path == str(base / "0002")
    assert [version for version, *_ in manager.status("m")] == [2]
    warnings = [r.getMessage() for r in caplog.records if huge in r.getMessage()]
    assert len(warnings) == 1 and "does not fit int64" in warnings[0]
    status = rest.status_json(manager, "m", None, None)  # REST status answered 500
    assert [v["version"] for v in status["model_version_status"]] == ["2"]
    assert export.next_version(base) == 3
    with pytest.raises(ValueError, match="fits int64"):
        export.export_saved_model(None, base, version=int(huge))
