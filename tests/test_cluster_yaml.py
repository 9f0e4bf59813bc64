"""cluster.yaml: Ray's own autoscaler validation, offline, and what a user relies on.

Ray checks a cluster config in `ray up` (ray/autoscaler/_private/commands.py,
_bootstrap_config): prepare_config() merges it with the provider's defaults.yaml, then
validate_config() checks it against ray/autoscaler/ray-schema.json and the node-type rules.
Both run here without any cloud. Where moto is installed, the AWS bootstrap step (IAM,
key pair, subnets, security groups) also runs, against moto's in-memory AWS.
"""
import copy
import ipaddress
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
DASHBOARD_PORT = 8265
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it after Ray's offline checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def header() -> str:
    """The comment block at the top of cluster.yaml, '#' stripped, continuation lines joined."""
    lines = []
    for line in CLUSTER_YAML.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines).replace("\\\n", " ")


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]}


def gpu_type(config: dict) -> str:
    (name,) = [n for n, t in worker_types(config).items() if t["resources"].get("GPU", 0) > 0]
    return name


def cpu_type(config: dict) -> str:
    (name,) = [n for n, t in worker_types(config).items()
               if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    return name


def setup_commands(config: dict, node_type: str) -> list[str]:
    """What Ray runs on a node of this type: the head runs head_setup_commands (already merged
    with setup_commands by prepare_config); a worker runs its type's own worker_setup_commands
    when the type has them, else the merged global list (autoscaler.py,
    _get_node_type_specific_fields)."""
    if node_type == config["head_node_type"]:
        return config["head_setup_commands"]
    return config["available_node_types"][node_type].get(
        "worker_setup_commands", config["worker_setup_commands"])


def pinned(name: str, text: str) -> str:
    match = re.search(rf"{re.escape(name)}(?:\[[^\]]*\])?==([0-9][^\s\"']*)", text)
    assert match, f"no {name}==<version> in {text!r}"
    return match.group(1)


def test_ray_validation_accepts_it_and_is_really_checking(raw, prepared):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert prepared["provider"]["type"] == "aws"
    # The same validation rejects a typo in a node type (the schema forbids unknown keys) and
    # a head type that does not exist.
    typo = copy.deepcopy(raw)
    typo["available_node_types"][cpu_type(raw)]["min_worker"] = 1
    with pytest.raises(ValidationError):
        validate_config(prepare_config(typo))
    no_head = copy.deepcopy(raw)
    no_head["head_node_type"] = "nonexistent"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(no_head))


def test_node_types_and_sizes(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["max_workers"] == 0 and head["min_workers"] == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "training and data tasks belong on worker nodes"
    cpu, gpu = types[cpu_type(prepared)], types[gpu_type(prepared)]
    assert cpu["resources"]["CPU"] > 0 and gpu["resources"]["GPU"] > 0
    for name, t in worker_types(prepared).items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
    assert sum(t["min_workers"] for t in types.values()) <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0


def test_setup_commands_install_torch_then_the_project(prepared):
    import ray

    # The repository copy: `ray up` runs from the repo root, so the local side is the root.
    mounts = {remote: (ROOT / local).resolve() for remote, local in prepared["file_mounts"].items()}
    (repo_on_node,) = [remote for remote, local in mounts.items() if local == ROOT]
    assert (ROOT / "pyproject.toml").is_file()
    ci_torch = pinned("torch", (ROOT / ".ci" / "run").read_text())

    for node_type in prepared["available_node_types"]:
        commands = setup_commands(prepared, node_type)
        for command in commands:
            check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert check.returncode == 0, f"{node_type}: bad bash: {command}\n{check.stderr}"
        torch_at = [i for i, c in enumerate(commands)
                    if re.search(r"pip install\b.*\btorch==", c)]
        project_at = [i for i, c in enumerate(commands)
                      if re.search(rf"pip install -e {re.escape(repo_on_node)}(\s|$)", c)]
        assert len(torch_at) == 1 and len(project_at) == 1, (node_type, commands)
        assert torch_at[0] < project_at[0], f"{node_type}: torch must be pinned before the project"
        torch_cmd, project_cmd = commands[torch_at[0]], commands[project_at[0]]
        assert pinned("torch", torch_cmd) == ci_torch == "2.13.0"
        if node_type == gpu_type(prepared):
            assert "whl/cpu" not in torch_cmd, "GPU nodes need the CUDA build"
        else:
            assert f"--index-url {TORCH_CPU_INDEX}" in torch_cmd, node_type
        # The cluster runs the laptop's Ray: `ray up` expects the same version on both sides.
        assert pinned("ray", project_cmd) == ray.__version__
        # Ray's `default` extra runs the dashboard and so the job server.
        assert re.search(r"ray\[[^\]]*\bdefault\b", project_cmd), project_cmd
    assert any("boto3" in c for c in prepared["head_setup_commands"]), "the autoscaler needs boto3"


def test_start_commands_parse_and_keep_the_dashboard_local(prepared):
    from ray.scripts.scripts import start

    parsed, auth_modes = {}, {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in prepared[key]:
            assert "0.0.0.0" not in command
            for part in command.split(";"):
                words = shlex.split(part)
                if words[:2] == ["ray", "start"]:
                    parsed[key] = start.make_context("start", words[2:]).params  # click validates
                    auth_modes[key] = re.findall(r"RAY_AUTH_MODE=(\w+)", command)
    # Head and workers agree on token auth, else workers cannot join (see cluster.yaml).
    assert auth_modes["head_start_ray_commands"] == auth_modes["worker_start_ray_commands"]
    assert len(auth_modes["head_start_ray_commands"]) == 1
    head, worker = parsed["head_start_ray_commands"], parsed["worker_start_ray_commands"]
    assert head["head"] and head["include_dashboard"]
    assert head["dashboard_host"] in ("127.0.0.1", "localhost")
    assert head["dashboard_port"] == DASHBOARD_PORT
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert not worker["head"] and worker["address"] == f"$RAY_HEAD_IP:{head['port']}"


def _world_rules(permissions: list) -> list:
    """Rules that admit the whole internet."""
    return [p for p in permissions
            if any(ipaddress.ip_network(r["CidrIp"]).prefixlen == 0 for r in p.get("IpRanges", []))
            or any(ipaddress.ip_network(r["CidrIpv6"]).prefixlen == 0
                   for r in p.get("Ipv6Ranges", []))]


def test_no_ingress_from_the_internet(prepared):
    # Every node type names its security group, so Ray never creates its default one (which
    # opens SSH to 0.0.0.0/0, see the moto test below); one group for all, so nodes reach
    # each other through its self-referencing rule.
    groups = [t["node_config"].get("SecurityGroupIds")
              for t in prepared["available_node_types"].values()]
    assert all(groups) and all(g == groups[0] for g in groups), groups
    extra = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not _world_rules(extra)
    # The documented group: port 22 from one address, nothing else from outside the group.
    text = header()
    rules = [line for line in text.splitlines() if "authorize-security-group-ingress" in line]
    cidrs = [shlex.split(r)[shlex.split(r).index("--cidr") + 1] for r in rules if "--cidr" in r]
    assert len(cidrs) == 1 and "--port 22 " in next(r for r in rules if "--cidr" in r)
    if cidrs[0].startswith("$"):  # a shell variable set earlier in the block
        cidrs[0] = re.search(rf"^{re.escape(cidrs[0][1:])}=(.*)$", text, re.M).group(1)
    assert cidrs[0].strip().endswith("/32"), cidrs[0]
    assert not any("0.0.0.0" in r or "::/0" in r for r in rules)
    assert any("--source-group" in r for r in rules)
    assert str(DASHBOARD_PORT) not in " ".join(rules)


def test_header_documents_usage_and_a_valid_job(raw):
    from raypar.config import load_spec

    text = header()
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit",
                 "ray down cluster.yaml"):
        assert step in text, step
    # The documented job command is a valid raypar run with S3 checkpoint storage.
    (submit,) = [line for line in text.splitlines()
                 if "ray job submit" in line and "jobs/train.py" in line]
    words = shlex.split(submit.split("#")[0])
    assert "--working-dir" in words
    assert words[words.index("--address") + 1].startswith("http://127.0.0.1:")
    args = words[words.index("jobs/train.py") + 1:]
    assert (ROOT / "jobs" / "train.py").is_file()
    assert "--run-dir" in args, "a job's own working directory is temporary"
    config = args[args.index("--config") + 1]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    spec = load_spec(ROOT / config, sets)
    assert spec.checkpoint.storage_path.startswith("s3://")


@pytest.fixture
def fake_aws(monkeypatch, tmp_path):
    """moto's in-memory AWS, with the instance profile Ray would otherwise create (and then
    sleep 15 s for); no real credentials or ~/.aws are visible."""
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    region = yaml.safe_load(CLUSTER_YAML.read_text())["provider"]["region"]
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": region}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray saves its generated key pair in ~/.ssh
    with moto.mock_aws():
        iam = boto3.client("iam")
        iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument="{}")
        iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
        iam.add_role_to_instance_profile(InstanceProfileName="ray-autoscaler-v1",
                                         RoleName="ray-autoscaler-v1")
        yield boto3.client("ec2", region_name=region)


def _make_documented_group(ec2) -> str:
    """The security group the header tells the user to create."""
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    sg = ec2.create_security_group(GroupName="raypar-cluster", Description="raypar",
                                   VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}])
    return sg


def test_aws_bootstrap_offline(raw, fake_aws):
    """`ray up`'s whole config step (_bootstrap_config) against moto: it launches nothing."""
    from ray.autoscaler._private.commands import _bootstrap_config

    ec2 = fake_aws
    sg = _make_documented_group(ec2)
    config = copy.deepcopy(raw)
    for t in config["available_node_types"].values():
        assert t["node_config"]["SecurityGroupIds"] == ["sg-REPLACE-ME"]
        t["node_config"]["SecurityGroupIds"] = [sg]
    resolved = _bootstrap_config(config, no_config_cache=True)

    sg_vpc = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]["VpcId"]
    subnet_vpcs = {s["SubnetId"]: s["VpcId"] for s in ec2.describe_subnets()["Subnets"]}
    for name, t in resolved["available_node_types"].items():
        node = t["node_config"]
        assert node["SecurityGroupIds"] == [sg], name
        assert node["ImageId"] == raw["available_node_types"][name]["node_config"]["ImageId"]
        assert {subnet_vpcs[s] for s in node["SubnetIds"]} == {sg_vpc}, name
    # Workers use the instance profile Ray gives the head (for S3 checkpoints).
    head_profile = resolved["head_node"]["IamInstanceProfile"]["Arn"]
    for name, t in worker_types(resolved).items():
        assert head_profile.endswith("/" + t["node_config"]["IamInstanceProfile"]["Name"]), name
    # Ray created no group and added no rule: nothing admits the internet.
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert sorted(g["GroupName"] for g in groups) == ["default", "raypar-cluster"]
    for g in groups:
        assert not _world_rules(g["IpPermissions"]), g


def test_a_group_ray_creates_itself_would_open_ssh_to_the_world(raw, fake_aws):
    """Why cluster.yaml names its security group instead of letting Ray make one."""
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    config = copy.deepcopy(raw)
    for t in config["available_node_types"].values():
        del t["node_config"]["SecurityGroupIds"]
    bootstrap_aws(prepare_config(config))  # the AWS step of _bootstrap_config, minus its slow part
    (made,) = [g for g in fake_aws.describe_security_groups()["SecurityGroups"]
               if g["GroupName"] != "default"]
    assert [(p["FromPort"], p["ToPort"]) for p in _world_rules(made["IpPermissions"])] == [(22, 22)]
