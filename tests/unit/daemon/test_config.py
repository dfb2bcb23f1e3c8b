"""rallypoint.daemon.config: defaults, precedence, every error path, the shipped example."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from rallypoint.daemon import config as cfg
from rallypoint.daemon.config import Config, add_arguments, load_config
from rallypoint.errors import ConfigError
from rallypoint.rendezvous.etcd import EtcdSettings

EXAMPLE = Path(__file__).resolve().parents[3] / "systemd" / "rallyd.toml.example"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never read the host's /etc file, and never import torch to count GPUs."""
    monkeypatch.setattr(cfg, "DEFAULT_PATH", tmp_path / "absent" / "rallyd.toml")
    monkeypatch.setattr(cfg, "detect_gpus", lambda: pytest.fail("GPU detection was not needed"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rallyd.toml"
    path.write_text(text)
    return path


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def error(tmp_path: Path, text: str = "", env: dict | None = None, argv: tuple = ()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {}, flags(*argv))
    return str(info.value)


# -- defaults and precedence ------------------------------------------------------------------


def test_defaults_when_the_default_file_is_missing():
    c = load_config(env={})
    assert c.path is None
    assert (c.cluster, c.address, c.state_dir) == ("default", "127.0.0.1", Path("/var/lib/rallypoint"))
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", c.node)
    assert c.etcd.endpoints == ("127.0.0.1:2379",)
    assert c.etcd.request_timeout == timedelta(seconds=2)
    assert c.etcd.retry_deadline == timedelta(seconds=10)
    assert c.etcd.endpoint_retry == timedelta(seconds=0.5)
    assert c.etcd.keepalive == timedelta(seconds=5)
    assert c.etcd.ca_cert is c.etcd.user is c.etcd.password is None
    r = c.rendezvous
    assert (r.lease_ttl, r.last_call, r.heartbeat) == (
        timedelta(seconds=3), timedelta(seconds=0.5), timedelta(seconds=1))
    assert (r.min_nodes, r.max_nodes) == (1, 0)
    lay = c.layout
    assert (lay.tp, lay.pp, lay.dp, lay.ep, lay.expert_copies) == (1, 1, 0, "tp", 1)
    assert (lay.gpus, lay.cpu_ranks, lay.spares) == (-1, 2, 0)
    assert c.collectives.deadline_floor == timedelta(seconds=1)
    assert c.collectives.deadline_k == 20.0
    assert (c.log.level, c.log.json) == ("info", None)
    assert c == replace(Config(), path=None)


def test_heartbeat_follows_lease_ttl_unless_given(tmp_path):
    c = load_config(write(tmp_path, "[rendezvous]\nlease_ttl = 6\n"), {})
    assert c.rendezvous.heartbeat == timedelta(seconds=2)
    c = load_config(write(tmp_path, "[rendezvous]\nlease_ttl = 6\nheartbeat = 0.5\n"), {})
    assert c.rendezvous.heartbeat == timedelta(seconds=0.5)


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    path = write(tmp_path, 'cluster = "from-file"\nnode = "n-file"\n'
                           '[layout]\ntp = 2\npp = 2\ngpus = 8\n'
                           '[etcd]\nendpoints = ["f:1"]\n[log]\nlevel = "debug"\n')
    env = {"RALLYPOINT_CLUSTER": "from-env", "RALLYPOINT_LAYOUT_TP": "4",
           "RALLYPOINT_ETCD_ENDPOINTS": "a:1, https://b:2", "RALLYPOINT_ETCD_CA_CERT": str(path)}
    c = load_config(path, env, flags("--tp", "8", "--pp", "1", "--no-log-json"))
    assert c.path == path
    assert c.cluster == "from-env"                  # env over file
    assert c.node == "n-file"                       # file over default
    assert (c.layout.tp, c.layout.pp) == (8, 1)     # flag over env, flag over file
    assert c.layout.gpus == 8 and c.layout.dp == 0  # file, default
    assert c.etcd.endpoints == ("a:1", "https://b:2")
    assert c.log.level == "debug" and c.log.json is False
    c = load_config(path, env, flags("--cluster", "from-flag", "--etcd-endpoints", "x:9",
                                     "--log-json", "--cpu-ranks", "4"))
    assert (c.cluster, c.etcd.endpoints, c.log.json, c.layout.cpu_ranks) == (
        "from-flag", ("x:9",), True, 4)


def test_env_values_are_parsed_into_the_key_type(tmp_path):
    env = {"RALLYPOINT_RENDEZVOUS_LEASE_TTL": "9", "RALLYPOINT_RENDEZVOUS_MIN_NODES": "2",
           "RALLYPOINT_LOG_JSON": "off", "RALLYPOINT_STATE_DIR": str(tmp_path),
           "RALLYPOINT_WORKER_DTYPE": "BFLOAT16", "RALLYPOINT_LAYOUT_SPARES": "",
           "RALLYPOINT_ETCD_BIN": "/usr/bin/etcd", "RALLYPOINT_CONFIG": ""}
    c = load_config(env=env)
    assert c.rendezvous.lease_ttl == timedelta(seconds=9)
    assert c.rendezvous.min_nodes == 2 and c.log.json is False
    assert c.state_dir == tmp_path and c.worker.dtype == "bfloat16"
    assert c.layout.spares == 0  # an empty variable is not set
    assert load_config(env={"RALLYPOINT_LOG_JSON": "auto"}).log.json is None


def test_config_file_named_by_flag_then_argument_then_env(tmp_path):
    a, b, c = (tmp_path / f"{n}.toml" for n in "abc")
    for p in (a, b, c):
        p.write_text(f'cluster = "{p.stem}"\n')
    env = {"RALLYPOINT_CONFIG": str(c)}
    assert load_config(b, env, flags("--config", str(a))).cluster == "a"
    assert load_config(b, env).cluster == "b"
    assert load_config(None, env).cluster == "c"


def test_to_settings_gives_float_seconds(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = load_config(write(tmp_path, f'[etcd]\nendpoints = ["https://e1:2379", "e2:2379"]\n'
                                    f'request_timeout = 1.5\nca_cert = "{ca}"\n'
                                    'user = "u"\npassword = "p"\n'), {})
    assert c.etcd.to_settings() == EtcdSettings(
        endpoints=("https://e1:2379", "e2:2379"), request_timeout=1.5, retry_deadline=10.0,
        endpoint_retry=0.5, keepalive=5.0, ca_cert=str(ca), user="u", password="p")
    assert "password" not in repr(c.etcd)  # kept out of log lines


def test_module_import_does_not_import_torch():
    code = "import sys, rallypoint.daemon.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=EXAMPLE.parents[1])
    assert out.stdout.strip() == "False"


# -- the layout against this node ----------------------------------------------------------------


@pytest.mark.parametrize("tp,pp,gpus", [(1, 1, 3), (2, 1, 4), (4, 2, 8), (8, 2, 8), (3, 1, 6),
                                        (6, 1, 3), (2, 2, 1)])
def test_layouts_that_fit(tmp_path, tp, pp, gpus):
    c = load_config(env={}, args=flags("--tp", str(tp), "--pp", str(pp), "--gpus", str(gpus)))
    assert c.layout.replica_size == tp * pp and c.layout.node_slots() == gpus


def test_layout_that_does_not_divide_the_gpus(tmp_path):
    msg = error(tmp_path, "[layout]\ntp = 3\ngpus = 4\n")
    assert "[layout] tp*pp = 3 does not divide this node's 4 GPUs (and is not a multiple of it)" in msg
    assert f"tp from {tmp_path / 'rallyd.toml'}" in msg and "pp from default" in msg
    msg = error(tmp_path, "[layout]\ngpus = 4\n", argv=("--tp", "2", "--pp", "3"))
    assert "tp*pp = 6 does not divide this node's 4 GPUs" in msg and "pp from --pp" in msg


def test_cpu_node_uses_cpu_rank_slots(tmp_path):
    assert load_config(env={}, args=flags("--gpus", "0", "--tp", "4")).layout.node_slots() == 2
    msg = error(tmp_path, "[layout]\ngpus = 0\ntp = 3\n")
    assert "tp*pp = 3 does not divide this node's 2 CPU rank slots" in msg
    assert "cpu_ranks from default" in msg


def test_gpus_detected_only_when_needed(monkeypatch):
    calls = []
    monkeypatch.setattr(cfg, "detect_gpus", lambda: calls.append(1) or 4)
    assert load_config(env={}).layout.gpus == -1 and calls == []  # tp*pp = 1 fits anything
    load_config(env={"RALLYPOINT_LAYOUT_TP": "2"}, check_node=False)
    assert calls == []
    assert load_config(env={"RALLYPOINT_LAYOUT_TP": "2"}).layout.node_slots() == 4
    assert calls
    with pytest.raises(ConfigError, match=r"tp\*pp = 3 does not divide this node's 4 GPUs \(detected\)"):
        load_config(env={"RALLYPOINT_LAYOUT_TP": "3"})


def test_detected_zero_gpus_means_cpu_slots(monkeypatch):
    monkeypatch.setattr(cfg, "detect_gpus", lambda: 0)
    assert load_config(env={}, args=flags("--tp", "2")).layout.node_slots() == 2
    with pytest.raises(ConfigError, match="2 CPU rank slots"):
        load_config(env={}, args=flags("--tp", "3"))


# -- errors: types, names, sections ----------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ('[layout]\ntp = "two"\n', '[layout] tp: expected an integer, got "two"'),
    ("[layout]\ntp = true\n", "[layout] tp: expected an integer, got true"),
    ("[layout]\ndp = 1.5\n", "[layout] dp: expected an integer, got 1.5"),
    ("[rendezvous]\nlease_ttl = false\n", "[rendezvous] lease_ttl: expected a number of seconds, got false"),
    ('[rendezvous]\nlease_ttl = "3s"\n', '[rendezvous] lease_ttl: expected a number of seconds, got "3s"'),
    ("[rendezvous]\nlease_ttl = nan\n", "[rendezvous] lease_ttl: expected a number of seconds"),
    ('[collectives]\ndeadline_k = "x"\n', '[collectives] deadline_k: expected a number, got "x"'),
    ("cluster = 5\n", "cluster: expected a string, got 5"),
    ("[cluster]\nname = 1\n", "cluster: expected a string, got a table"),
    ('cluster = "a/b"\n', 'cluster: expected only letters, digits, \'_\', \'.\' and \'-\', got "a/b"'),
    ('node = "my node"\n', 'node: expected only letters'),
    ('address = ""\n', "address: must not be empty"),
    ('[log]\njson = "yes"\n', '[log] json: expected true, false or "auto", got "yes"'),
    ('[log]\nlevel = "verbose"\n', '[log] level: expected one of debug, info, warning, error, got "verbose"'),
    ('[worker]\nworkload = "train"\n', '[worker] workload: expected one of serve, allreduce-probe'),
    ("[etcd]\nendpoints = [1]\n", "[etcd] endpoints: expected a list of host:port strings, got [1]"),
    ('[etcd]\nendpoints = ["nohost"]\n', '[etcd] endpoints: bad endpoint "nohost"'),
    ('[etcd]\nendpoints = ["ftp://a:1"]\n', '[etcd] endpoints: bad endpoint "ftp://a:1"'),
    ("[etcd]\nendpoints = []\n", "[etcd] endpoints: needs at least one endpoint"),
    ('[etcd]\nca_cert = "/nonexistent/ca.pem"\n', "[etcd] ca_cert: file not found: /nonexistent/ca.pem"),
    ("etcd = 3\n", "[etcd] must be a table, got 3"),
])
def test_wrong_type_or_value_names_file_and_key(tmp_path, text, expected):
    msg = error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'rallyd.toml'}: ")
    assert expected in msg


@pytest.mark.parametrize("text,expected", [
    ("[layout]\ntp = 0\n", "[layout] tp: must be >= 1, got 0"),
    ("[layout]\npp = -1\n", "[layout] pp: must be >= 1, got -1"),
    ("[layout]\ndp = -1\n", "[layout] dp: must be >= 0, got -1"),
    ("[layout]\nep = 0\n", "[layout] ep: expected a string, got 0"),
    ("[layout]\nep = \"all\"\n", "[layout] ep: expected one of tp, dp, got \"all\""),
    ("[layout]\nexpert_copies = 0\n", "[layout] expert_copies: must be >= 1, got 0"),
    ("[layout]\nprefill_replicas = -1\n", "[layout] prefill_replicas: must be >= 0, got -1"),
    ("[layout]\nprefill_replicas = 1\ntp = 2\ncpu_ranks = 2\n",
     "[layout] prefill_replicas moves KV between whole-model replicas: it needs tp = 1 and pp = 1, got tp = 2"),
    ("[layout]\nprefill_replicas = 1\nep = \"dp\"\n", "[layout] prefill_replicas and ep = \"dp\" do not go together yet"),
    ("[layout]\nep = \"dp\"\ntp = 2\ncpu_ranks = 2\n", "[layout] ep = \"dp\" spreads the experts over whole-model replicas: "
                                                       "it needs tp = 1 and pp = 1, got tp = 2, pp = 1"),
    ("[layout]\ngpus = -2\n", "[layout] gpus: must be >= -1, got -2"),
    ("[layout]\ncpu_ranks = 0\n", "[layout] cpu_ranks: must be >= 1, got 0"),
    ("[layout]\nspares = -1\n", "[layout] spares: must be >= 0, got -1"),
    ("[metrics]\nport = -1\n", "[metrics] port: must be >= 0, got -1"),
    ("[metrics]\nport = 70000\n", "[metrics] port = 70000 is not a TCP port (0..65535)"),
    ("[worker]\napi_port = 65536\n", "[worker] api_port = 65536 is not a TCP port (0..65535)"),
    ("[rendezvous]\nlease_ttl = 0\n", "[rendezvous] lease_ttl: must be > 0, got 0.0"),
    ("[rendezvous]\nlast_call = -0.1\n", "[rendezvous] last_call: must be >= 0, got -0.1"),
    ("[rendezvous]\nmin_nodes = 0\n", "[rendezvous] min_nodes: must be >= 1, got 0"),
    ("[rendezvous]\nheartbeat = 0\n", "[rendezvous] heartbeat: must be > 0"),
    ("[etcd]\nrequest_timeout = -2\n", "[etcd] request_timeout: must be > 0, got -2.0"),
    ("[etcd]\nretry_deadline = 0\n", "[etcd] retry_deadline: must be > 0"),
    ("[collectives]\ndeadline_floor = 0\n", "[collectives] deadline_floor: must be > 0"),
    ("[collectives]\ndeadline_k = 0\n", "[collectives] deadline_k: must be > 0"),
])
def test_out_of_range(tmp_path, text, expected):
    assert expected in error(tmp_path, text)


def test_unknown_key_suggests_the_nearest(tmp_path):
    msg = error(tmp_path, "[layout]\ntpp = 2\n")
    assert msg == f"{tmp_path / 'rallyd.toml'}: unknown key [layout] tpp (did you mean tp?)"
    assert "unknown key clustr (did you mean cluster?)" in error(tmp_path, 'clustr = "x"\n')
    assert "unknown key [etcd] zzz" in error(tmp_path, "[etcd]\nzzz = 1\n")


def test_unknown_section_suggests_the_nearest(tmp_path):
    assert "unknown section [layot] (did you mean [layout]?)" in error(tmp_path, "[layot]\ntp = 2\n")
    assert "unknown section [tracing]" in error(tmp_path, "[tracing]\nport = 1\n")
    assert "unknown section [metric] (did you mean [metrics]?)" in error(tmp_path, "[metric]\nport = 1\n")


def test_bad_toml_and_missing_named_file(tmp_path):
    assert "invalid TOML" in error(tmp_path, "[layout\n")
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml", {})
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(None, {}, flags("--config", str(tmp_path / "nope.toml")))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, {})  # a directory


@pytest.mark.parametrize("env,expected", [
    ({"RALLYPOINT_LAYOUT_TP": "two"}, 'RALLYPOINT_LAYOUT_TP: [layout] tp: expected an integer, got "two"'),
    ({"RALLYPOINT_LAYOUT_TP": "2.0"}, "RALLYPOINT_LAYOUT_TP: [layout] tp: expected an integer"),
    ({"RALLYPOINT_RENDEZVOUS_LEASE_TTL": "soon"},
     "RALLYPOINT_RENDEZVOUS_LEASE_TTL: [rendezvous] lease_ttl: expected a number of seconds"),
    ({"RALLYPOINT_LOG_JSON": "maybe"}, 'RALLYPOINT_LOG_JSON: [log] json: expected true, false or "auto", got "maybe"'),
    ({"RALLYPOINT_NODE": "a b"}, "RALLYPOINT_NODE: node: expected only letters"),
    ({"RALLYPOINT_ETCD_ENDPOINTS": "a:1,b"}, 'RALLYPOINT_ETCD_ENDPOINTS: [etcd] endpoints: bad endpoint "b"'),
    ({"RALLYPOINT_LAYOUT_TPP": "2"}, "RALLYPOINT_LAYOUT_TPP: unknown key [layout] tpp (did you mean RALLYPOINT_LAYOUT_TP?)"),
])
def test_env_errors_name_the_variable(tmp_path, env, expected):
    assert expected in error(tmp_path, env=env)


def test_flag_errors_name_the_flag(tmp_path):
    assert '--tp: [layout] tp: expected an integer, got "x"' in error(tmp_path, argv=("--tp", "x"))
    assert "--rendezvous-lease-ttl: [rendezvous] lease_ttl: must be > 0" in error(
        tmp_path, argv=("--rendezvous-lease-ttl", "0"))
    assert "--dp: [layout] dp: must be >= 0, got -1" in error(tmp_path, argv=("--dp=-1",))


def test_no_password_flag():
    with pytest.raises(SystemExit):
        flags("--etcd-password", "x")


# -- errors: rules across keys and timing invariants -----------------------------------------------


def test_user_and_password_together(tmp_path):
    msg = error(tmp_path, '[etcd]\nuser = "u"\n')
    assert "[etcd] user and password must be given together" in msg
    assert f"user from {tmp_path / 'rallyd.toml'}" in msg and "password from default" in msg
    assert "given together" in error(tmp_path, env={"RALLYPOINT_ETCD_PASSWORD": "p"})


def test_tls_rules(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    assert "cert_key and cert_cert must be given together" in error(
        tmp_path, f'[etcd]\nca_cert = "{pem}"\ncert_key = "{pem}"\n')
    assert "ca_cert is required for TLS" in error(
        tmp_path, f'[etcd]\ncert_key = "{pem}"\ncert_cert = "{pem}"\n')
    assert "ca_cert is required for TLS" in error(tmp_path, '[etcd]\nendpoints = ["https://e:2379"]\n')


def test_min_nodes_above_max_nodes(tmp_path):
    msg = error(tmp_path, "[rendezvous]\nmin_nodes = 3\nmax_nodes = 2\n")
    assert "[rendezvous] min_nodes = 3 > max_nodes = 2" in msg
    load_config(write(tmp_path, "[rendezvous]\nmin_nodes = 3\n"), {})  # max 0 = unlimited


def test_heartbeat_must_be_under_half_the_lease(tmp_path):
    msg = error(tmp_path, "[rendezvous]\nheartbeat = 1.5\n")
    assert "[rendezvous] heartbeat = 1.5s must be < [rendezvous] lease_ttl / 2 = 1.5s" in msg
    assert "heartbeat from" in msg and "lease_ttl from default" in msg


def test_request_timeout_must_be_under_the_lease(tmp_path):
    msg = error(tmp_path, env={"RALLYPOINT_RENDEZVOUS_LEASE_TTL": "2"})
    assert "[etcd] request_timeout = 2s must be < [rendezvous] lease_ttl = 2s" in msg
    assert "lease_ttl from RALLYPOINT_RENDEZVOUS_LEASE_TTL" in msg


def test_last_call_must_be_under_the_lease(tmp_path):
    msg = error(tmp_path, "[rendezvous]\nlast_call = 3\n", argv=("--rendezvous-heartbeat", "1"))
    assert "[rendezvous] last_call = 3s must be < [rendezvous] lease_ttl = 3s" in msg


# -- the shipped example -------------------------------------------------------------------------


def test_example_loads(monkeypatch):
    c = load_config(EXAMPLE, {})
    assert c.path == EXAMPLE and replace(c, path=None) == Config()


def test_example_documents_every_key_with_its_default(tmp_path):
    section, shown, active = "", set(), []
    site = {"node", "ca_cert", "cert_key", "cert_cert", "user", "password", "json", "model", "api_key",
            "max_batch", "max_seq", "processes"}  # site- or device-specific: their default is "unset"
    for line in EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = m[1]
        elif m := re.fullmatch(r"#(\w+) = .*", line):
            shown.add((section, m[1]))
            active.append(line if m[1] in site else line[1:])
            continue
        active.append(line)
    expected = {(s, k) for s in ("", *cfg._SECTIONS) for k in cfg._schema(s)}
    assert shown == expected
    c = load_config(write(tmp_path, "\n".join(active)), {})  # every default, written out
    assert replace(c, path=None) == Config()


def test_kv_size_defaults_by_device_and_explicit_values_win(tmp_path):
    unset = load_config(write(tmp_path, "[worker]\n"), {}).worker
    assert unset.kv_size(gpu=True) == (0, 0)  # sized from the GPU's free memory, the model's context
    assert unset.kv_size(gpu=False) == (8, 512)
    given = load_config(write(tmp_path, "[worker]\nmax_batch = 32\nmax_seq = 0\n"), {}).worker
    assert given.kv_size(gpu=True) == given.kv_size(gpu=False) == (32, 0)


def test_gateway_processes_by_node_size_and_explicit_values_win(tmp_path):
    unset = load_config(write(tmp_path, "[gateway]\n"), {}).gateway
    assert [unset.process_count(c) for c in (None, 1, 2, 4, 7)] == [0] * 5  # a thread of rallyd
    assert [unset.process_count(c) for c in (8, 16, 64)] == [2, 4, 4]
    assert load_config(write(tmp_path, "[gateway]\nprocesses = 0\n"), {}).gateway.process_count(64) == 0
    assert load_config(write(tmp_path, "[gateway]\nprocesses = 3\n"), {}).gateway.process_count(2) == 3
    assert load_config(write(tmp_path, "[gateway]\n"), {"RALLYPOINT_GATEWAY_PROCESSES": "2"}).gateway.processes == 2
    with pytest.raises(ConfigError, match="processes"):
        load_config(write(tmp_path, "[gateway]\nprocesses = -1\n"), {})
