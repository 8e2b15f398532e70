"""cluster.yaml passes Ray's own launcher checks, keeps SSH private and sets up Python >= 3.11."""

import copy
import importlib
import importlib.util
import re
import shlex
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.sweep.cluster_sandbox import Sandbox

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"
THE_WHOLE_INTERNET = {"0.0.0.0/0", "::/0"}


def _config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _prepared() -> dict:
    """The config as `ray up` sees it: defaults filled in, setup_commands merged per node kind."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    return util.prepare_config(_config())


def test_cluster_yaml_passes_rays_launcher_checks() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = _prepared()
    util.validate_config(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0  # the head runs no trials
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1 and nodes["gpu_worker"]["min_workers"] == 0
    for node in nodes.values():  # the user's own groups and subnets survive Ray's preparation
        assert node["node_config"]["SecurityGroupIds"] and node["node_config"]["SubnetIds"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


# --- Security groups -----------------------------------------------------------------------------


def test_every_node_type_runs_in_the_users_group_and_subnets() -> None:
    nodes = _config()["available_node_types"]
    for name, node in nodes.items():
        node_config = node["node_config"]
        assert node_config.get("SecurityGroupIds"), f"{name}: Ray would create an open group"
        assert node_config.get("SubnetIds"), f"{name}: no subnets in the group's VPC"
        assert not {"NetworkInterfaces", "LaunchTemplate"} & node_config.keys()  # would override
    # One group for all: its all-traffic rule from itself lets head and workers talk.
    assert len({tuple(n["node_config"]["SecurityGroupIds"]) for n in nodes.values()}) == 1
    assert len({tuple(n["node_config"]["SubnetIds"]) for n in nodes.values()}) == 1


def _boto_stand_ins() -> dict[str, types.ModuleType]:
    """Just enough of boto3/botocore for Ray's AWS module to import; any use of them fails."""

    def no_aws(*args, **kwargs):
        raise AssertionError(f"Ray called the AWS API: {args} {kwargs}")

    modules = {name: types.ModuleType(name) for name in ("boto3", "botocore")}
    for name in ("exceptions", "resources", "resources.base"):
        modules[f"boto3.{name}"] = types.ModuleType(f"boto3.{name}")
    for name in ("client", "config", "exceptions"):
        modules[f"botocore.{name}"] = types.ModuleType(f"botocore.{name}")
    modules["boto3"].__version__ = "1.34.0"
    modules["boto3"].resource = modules["boto3"].client = modules["boto3"].Session = no_aws
    modules["boto3.exceptions"].ResourceNotExistsError = type(
        "ResourceNotExistsError", (Exception,), {}
    )
    modules["boto3.resources.base"].ServiceResource = type("ServiceResource", (), {})
    modules["botocore.client"].BaseClient = type("BaseClient", (), {})
    modules["botocore.config"].Config = no_aws
    for error in ("ClientError", "WaiterError"):
        setattr(modules["botocore.exceptions"], error, type(error, (Exception,), {}))
    modules["botocore"].exceptions = modules["botocore.exceptions"]
    return modules


@pytest.fixture
def ray_aws():
    """Ray's AWS bootstrap module (ray/autoscaler/_private/aws/config.py). Where boto3 is not
    installed it is imported with stand-ins that fail the test if used, then forgotten again."""
    pytest.importorskip("ray.autoscaler._private.util")
    if importlib.util.find_spec("boto3") is not None:
        yield importlib.import_module("ray.autoscaler._private.aws.config")
        return
    package = importlib.import_module("ray.autoscaler._private.aws")
    stand_ins = _boto_stand_ins()
    sys.modules.update(stand_ins)
    try:
        yield importlib.import_module(f"{package.__name__}.config")
    finally:  # forget the stand-ins and everything imported with them
        imported = [name for name in sys.modules if name.startswith(f"{package.__name__}.")]
        for name in [*stand_ins, *imported]:
            del sys.modules[name]
        for name in ("config", "utils", "cloudwatch"):
            package.__dict__.pop(name, None)


def test_rays_security_group_step_leaves_the_users_groups_untouched(ray_aws) -> None:
    config = _prepared()
    before = copy.deepcopy(config["available_node_types"])
    aws = mock.Mock(side_effect=AssertionError("Ray called the AWS API"))
    with (
        mock.patch.object(ray_aws, "_resource", aws),
        mock.patch.object(ray_aws, "_client", aws),
        mock.patch.object(ray_aws, "_create_security_group") as create,
        mock.patch.object(ray_aws, "_update_inbound_rules") as authorize,
    ):
        configured = ray_aws._configure_security_group(config)
    assert aws.call_count == create.call_count == authorize.call_count == 0
    assert configured["available_node_types"] == before
    assert ray_aws.get_log_state()["security_group_src"] == dict.fromkeys(before, "config")


def _documented_commands() -> list[list[str]]:
    """The `aws ...` commands in cluster.yaml's comments, continuation lines joined, as argv."""
    commands, pending = [], ""
    for line in CLUSTER.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            continue
        text = pending + line.lstrip().lstrip("#").strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = text.split("#")[0]  # a trailing comment
        if "aws " in text:
            argv = shlex.split(text[text.index("aws ") :].rstrip(")"))
            commands.append(argv)
    return commands


def _documented_ingress() -> list[dict]:
    """The documented authorize-security-group-ingress commands as IpPermissions rules."""
    rules = []
    variables = dict(  # MY_CIDR=203.0.113.0/24 and the like
        re.match(r"#\s*(\w+)=(\S+)", line.strip()).groups()
        for line in CLUSTER.read_text().splitlines()
        if re.match(r"#\s*\w+=[^$\s]", line.strip())
    )
    for argv in _documented_commands():
        if argv[:3] != ["aws", "ec2", "authorize-security-group-ingress"]:
            continue
        args = dict(zip(argv[3::2], argv[4::2], strict=True))
        protocol = "-1" if args["--protocol"] in ("all", "-1") else args["--protocol"]
        port = args.get("--port")  # "22" or "8000-8100"; none for all traffic
        low, _, high = port.partition("-") if port else ("-1", "", "")
        rule = {"IpProtocol": protocol, "FromPort": int(low), "ToPort": int(high or low)}
        if "--cidr" in args:
            cidr = args["--cidr"]
            rule["IpRanges"] = [{"CidrIp": variables.get(cidr.removeprefix("$"), cidr)}]
        else:
            rule["UserIdGroupPairs"] = [{"GroupId": args["--source-group"]}]
        rule["GroupId"] = args["--group-id"]
        rules.append(rule)
    return rules


def test_documented_group_admits_ssh_from_your_range_and_the_rest_only_from_itself() -> None:
    commands = _documented_commands()
    assert any(argv[1:3] == ["ec2", "create-security-group"] for argv in commands)
    rules = _documented_ingress()
    group = {rule["GroupId"] for rule in rules}
    assert len(group) == 1, "all rules go to the one group the nodes use"
    from_addresses = [rule for rule in rules if "IpRanges" in rule]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in from_addresses] == [
        ("tcp", 22, 22)
    ]
    from_itself = {
        (r["IpProtocol"], r["FromPort"])
        for r in rules
        if r.get("UserIdGroupPairs") == [{"GroupId": r["GroupId"]}]
    }
    assert ("-1", -1) in from_itself  # all traffic between members: Ray's nodes talk freely
    assert ("tcp", 2049) in from_itself  # NFS to the EFS mount targets
    assert len(from_addresses) + len(from_itself) == len(rules)


def test_no_rule_anywhere_opens_the_cluster_to_the_whole_internet(ray_aws) -> None:
    config = _config()
    rules = list(config["provider"].get("security_group", {}).get("IpPermissions", []))
    if any(
        "SecurityGroupIds" not in n["node_config"] for n in config["available_node_types"].values()
    ):
        # Ray creates a group for such node types and authorizes its own defaults on it first.
        rules = ray_aws._create_default_inbound_rules({"sg-made-by-ray"}, rules)
    rules += _documented_ingress()
    assert rules
    opened = [
        rule
        for rule in rules
        for address in rule.get("IpRanges", []) + rule.get("Ipv6Ranges", [])
        if {address.get("CidrIp"), address.get("CidrIpv6")} & THE_WHOLE_INTERNET
    ]
    assert not opened


# --- Set-up: Python >= 3.11 in ~/venv, and the venv's tools everywhere ---------------------------


EFS_PLACEHOLDER = "fs-REPLACE-with-your-file-system-id"


def _commands(kind: str, efs: str | None = "fs-0123456789abcdef0") -> list[str]:
    """What Ray runs on a node of this kind, in order: set-up, then starting Ray; with the EFS
    file system filled in as a user does (None: left as shipped)."""
    config = _prepared()
    commands = config[f"{kind}_setup_commands"] + config[f"{kind}_start_ray_commands"]
    return [c.replace(EFS_PLACEHOLDER, efs or EFS_PLACEHOLDER) for c in commands]


def test_setup_mounts_the_efs_named_in_the_file_and_stops_on_the_placeholder(
    ubuntu_2204: Sandbox,
) -> None:
    assert any(EFS_PLACEHOLDER in c for c in _commands("head", efs=None))
    failed = ubuntu_2204.run(_commands("head", efs=None))
    assert failed is not None and "needs the DNS name of your EFS file system" in failed.stderr
    assert not any(line.split()[0].endswith("/mount") for line in ubuntu_2204.logged())
    assert ubuntu_2204.run(_commands("worker")) is None
    mounts = [line for line in ubuntu_2204.logged() if line.split()[0].endswith("/mount")]
    assert mounts and "fs-0123456789abcdef0.efs.eu-west-1.amazonaws.com:/ /mnt/shared" in mounts[0]


@pytest.fixture
def ubuntu_2204(tmp_path: Path) -> Sandbox:
    """A fresh node of the image: python3 is 3.10, python3.11 comes only from apt."""
    sandbox = Sandbox(tmp_path)
    sandbox.interpreter("python3", "3.10.12")
    sandbox.interpreter("python3.11", installed=False)
    return sandbox


@pytest.mark.parametrize("kind", ["head", "worker"])
def test_setup_builds_the_venv_from_python_311_on_a_fresh_node(
    ubuntu_2204: Sandbox, kind: str
) -> None:
    failed = ubuntu_2204.run(_commands(kind))
    assert failed is None, (failed.args, failed.stdout, failed.stderr)
    venv = ubuntu_2204.home / "venv" / "bin"
    assert ubuntu_2204.version(venv / "python") >= (3, 11)
    log = "\n".join(ubuntu_2204.logged())
    assert "add-apt-repository -y ppa:deadsnakes/ppa" in log
    assert "python3.11 python3.11-venv python3.11-dev" in log
    assert f"{venv}/python -m pip install -q -e {ubuntu_2204.home}/corroprune" in log
    assert "smp.create_model fpn" in log  # the ImageNet pre-fill, in the venv
    assert f"{venv}/ray stop" in log and f"{venv}/ray start" in log
    assert f"{ubuntu_2204.bin}/ray " not in log, "the image's ray, not the venv's"


def test_setup_keeps_a_present_python_311_and_rebuilds_a_venv_left_on_310(
    ubuntu_2204: Sandbox,
) -> None:
    ubuntu_2204.interpreter("python3.11")  # already installed
    assert ubuntu_2204.run(["python3 -m venv ~/venv"]) is None  # an earlier set-up's venv
    venv_python = ubuntu_2204.home / "venv" / "bin" / "python"
    assert ubuntu_2204.version(venv_python) == (3, 10)
    failed = ubuntu_2204.run(_commands("worker"))
    assert failed is None, (failed.args, failed.stdout, failed.stderr)
    assert ubuntu_2204.version(venv_python) >= (3, 11)
    assert not any("add-apt-repository" in line for line in ubuntu_2204.logged())


def test_setup_fails_loudly_when_the_venv_python_is_older_than_311(ubuntu_2204: Sandbox) -> None:
    ubuntu_2204.interpreter("python3.11", "3.10.12")  # a python3.11 that is really 3.10
    failed = ubuntu_2204.run(_commands("head"))
    assert failed is not None, "set-up went on with Python 3.10"
    assert "needs Python >= 3.11" in failed.stderr
    assert not any("pip install" in line for line in ubuntu_2204.logged())
