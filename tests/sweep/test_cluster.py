"""cluster.yaml passes Ray's own launcher checks and keeps the head free of trials."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_passes_rays_launcher_checks() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(yaml.safe_load(CLUSTER.read_text()))
    util.validate_config(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0  # the head runs no trials
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1 and nodes["gpu_worker"]["min_workers"] == 0


def test_cluster_exposes_nothing_publicly() -> None:
    config = yaml.safe_load(CLUSTER.read_text())
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22)
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
