"""A site with ``[bundle]``: verified before anything else, extracted into its state dir, trained from;
refused with one line and exit code 2 when bad; and, against a real aggregator through a real Mosquitto,
``needs_bundle`` instead of training when the fleet announces another bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fed_numpy_trainer as fnt
import pytest
from bundle_cases import LABELS, flip_byte, keys, make_bundle, synthetic_gradient_dir

from fedpeft_edge.bundle.build import sign_bundle
from fedpeft_edge.bundle.format import BundleError
from fedpeft_edge.bundle.signing import load_private_key
from fedpeft_edge.central.broker import BrokerHandle
from fedpeft_edge.central.config import load_aggregator_config
from fedpeft_edge.central.service import AggregatorService
from fedpeft_edge.protocol import notices
from fedpeft_edge.protocol.topics import Topics
from fedpeft_edge.protocol.transport import MqttTransport, TransportConfig
from fedpeft_edge.protocol.wire import DEFAULT_LIMITS
from fedpeft_edge.site.agent import EdgeAgent
from fedpeft_edge.site.bundle_setup import BUNDLES_DIR, BundleGate
from fedpeft_edge.site.config import load_agent_config
from fedpeft_edge.site.trainer_setup import build_trainer_setup
from fedpeft_edge.training.gradient_trainer import GradientTrainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("site_bundle_agent")
    gdir = synthetic_gradient_dir(root)
    priv, _, priv_path, pub_path = keys(root / "keys")
    _, _, _, other_pub_path = keys(root / "other")
    signed = make_bundle(root / "site.bundle", gdir, priv)
    unsigned = make_bundle(root / "unsigned.bundle", gdir)
    tampered = flip_byte(signed.path, root / "tampered.bundle", "gradient/base.data", at=7)
    return {"root": root, "gdir": gdir, "signed": signed, "unsigned": unsigned.path, "tampered": tampered,
            "pub": pub_path, "priv_path": priv_path, "other_pub": other_pub_path}


def _site_toml(tmp_path: Path, bundle: Path, pub: Path | None, extra: str = "") -> str:
    key = f'public_key = "{pub}"\n' if pub is not None else ""
    return (f'[agent]\nclient_id = "site-b"\nstate_dir = "{tmp_path}/state"\n'
            f'[bundle]\npath = "{bundle}"\n{key}{extra}')


def test_trainer_setup_from_a_verified_bundle(made, tmp_path) -> None:
    cfg = load_agent_config(text=_site_toml(tmp_path, made["signed"].path, made["pub"]))
    setup = build_trainer_setup(cfg)
    bid = made["signed"].bundle_id
    assert setup.bundle_id == bid and isinstance(setup.trainer, GradientTrainer)
    assert setup.spec_hash == made["signed"].manifest["peft"]["spec_hash"]
    folder = tmp_path / "state" / BUNDLES_DIR / bid
    assert cfg.trainer.gradient_dir == str(folder / "gradient")
    # the bundle's settings filled what the file left at its defaults
    assert cfg.fleet.name == "bundle-test" and cfg.codec.mode == "int8" and cfg.codec.block == 16
    assert cfg.data.options["model_kind"] == "text" and cfg.data.options["max_len"] == 10
    assert cfg.data.options["tokenizer_json"] == str(folder / "preprocess" / "tokenizer.json")
    # the second start reuses the extraction
    again = load_agent_config(text=_site_toml(tmp_path, made["signed"].path, made["pub"],
                                              '[fleet]\nname = "mine"\n[codec]\nmode = "fp32"\n'))
    assert build_trainer_setup(again).bundle_id == bid
    assert again.fleet.name == "mine" and again.codec.mode == "fp32"  # what the file sets wins


def test_label_names_must_match_the_bundle(made, tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "x", "label": c}) + "\n" for c in LABELS))
    wrong = list(reversed(LABELS))
    cfg = load_agent_config(text=_site_toml(tmp_path, made["signed"].path, made["pub"])
                            + f'[data]\npath = "{data}"\nclasses = {json.dumps(wrong)}\n')
    with pytest.raises(BundleError) as exc:
        build_trainer_setup(cfg)
    assert exc.value.reason == "mismatch"


def test_bundle_and_trainer_folders_are_exclusive(made, tmp_path) -> None:
    cfg = load_agent_config(text=_site_toml(tmp_path, made["signed"].path, made["pub"])
                            + f'[trainer]\ngradient_dir = "{tmp_path}"\n')
    with pytest.raises(ValueError, match="replaces"):
        build_trainer_setup(cfg)


def test_allow_unsigned_for_development(made, tmp_path) -> None:
    cfg = load_agent_config(text=_site_toml(tmp_path, made["unsigned"], None, "allow_unsigned = true\n"))
    assert build_trainer_setup(cfg).bundle_id is not None


@pytest.mark.parametrize(("case", "reason"), [("tampered", "tampered"), ("unsigned", "unsigned"),
                                              ("wrong key", "bad_signature"), ("no key", "no_key")])
def test_agent_refuses_a_bad_bundle_with_one_line_and_exit_2(made, tmp_path, case, reason) -> None:
    bundle = {"tampered": made["tampered"], "unsigned": made["unsigned"]}.get(case, made["signed"].path)
    pub = {"wrong key": made["other_pub"], "no key": None}.get(case, made["pub"])
    conf = tmp_path / "site.toml"
    conf.write_text(_site_toml(tmp_path, bundle, pub) + "[connection]\nport = 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "fedpeft_edge", "agent", "--config", str(conf)],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and f"bundle refused ({reason}): " in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    bundles = tmp_path / "state" / BUNDLES_DIR
    assert not bundles.exists() or list(bundles.iterdir()) == []  # nothing extracted


def test_bundle_gate() -> None:
    limits = DEFAULT_LIMITS
    a, b = "a" * 64, "b" * 64
    gate = BundleGate(a)
    said: list[tuple] = []

    def note(id_: str) -> bytes:
        return notices.encode_bundle_notice(notices.BundleNotice("f", id_, 1.0))

    assert gate.active and not gate.blocks(lambda *x: said.append(x), 1, None)
    gate.take(note(b), "f", limits)
    assert gate.blocks(lambda *x: said.append(x), 1, 3) and said == [("needs_bundle", 3, b)]
    assert gate.blocks(lambda *x: said.append(x), 1, 3) and len(said) == 1  # said once per connection
    assert gate.blocks(lambda *x: said.append(x), 2, 3) and len(said) == 2  # again after a reconnect
    gate.take(note(a), "other-fleet", limits)  # another fleet's notice changes nothing
    assert gate.needed() == b
    gate.take(b"{not json", "f", limits)
    assert gate.needed() == b
    gate.take(note(a), "f", limits)
    assert not gate.blocks(lambda *x: said.append(x), 2, 3) and said[-1] == ("online", 3, "")
    gate.take(b"", "f", limits)  # the retained notice cleared
    assert gate.fleet_id is None and not BundleGate(None).active


# --- against a real aggregator through Mosquitto -----------------------------------------------------------
FLEET = "bundles"


def _client(broker: BrokerHandle, name: str) -> MqttTransport:
    return MqttTransport(TransportConfig(host=broker.host, port=broker.port, client_id=name,
                                         clean_start=True))


@pytest.mark.slow  # aggregator and two agents over real Mosquitto
def test_site_with_another_bundle_reports_needs_bundle_and_does_not_train(mosquitto_broker: BrokerHandle,
                                                                         tmp_path: Path) -> None:
    fleet_id, stale_id = "f" * 64, "0" * 64
    svc = AggregatorService(load_aggregator_config(text=f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "{FLEET}"
[aggregator]
state_dir = "{tmp_path}/agg"
bundle_id = "{fleet_id}"
max_rounds = 1
quorum = 1
round_deadline_s = 60
final_linger_s = 0
[trainer]
kind = "factory"
factory = "fed_numpy_trainer:make"
"""))
    topics = Topics(FLEET)
    watcher = _client(mosquitto_broker, "bundle-watcher")
    watcher.subscribe(topics.status_filter)
    watcher.subscribe(topics.bundle)
    watcher.subscribe(topics.updates_filter)
    watcher.connect(10)
    agg_result: list[object] = []
    agg = threading.Thread(target=lambda: agg_result.append(svc.run(connect_timeout=10)), daemon=True)
    agg.start()
    assert svc.serving.wait(30)

    def site(name: str, bundle_id: str, idle: float) -> EdgeAgent:
        cfg = load_agent_config(text=f"""
[connection]
port = {mosquitto_broker.port}
[fleet]
name = "{FLEET}"
[agent]
client_id = "{name}"
state_dir = "{tmp_path}/{name}"
idle_exit_s = {idle}
exit_after_final = true
drain_timeout_s = 5
""")
        s = fnt.make(cfg)
        return EdgeAgent(cfg, s.trainer, s.train_batches_fn, s.eval_batches_fn, spec_hash=s.spec_hash,
                         bundle_id=bundle_id)

    try:
        stale = site("site-stale", stale_id, idle=3.0)
        stale_result = stale.run(connect_timeout=10)
        assert stale_result.rounds_sent == [] and stale_result.reason == "idle timeout"
        assert not any((tmp_path / "site-stale" / "outbox").glob("*.msg"))
        seen_notice, needs = None, None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (seen_notice is None or needs is None):
            m = watcher.get(0.2)
            if m is None:
                continue
            if m.topic == topics.bundle:
                seen_notice = notices.decode_bundle_notice(m.payload)
            elif m.topic == topics.status("site-stale") and m.payload:
                st = notices.decode_status(m.payload)
                if st.state == "needs_bundle":
                    needs = st
            assert not m.topic.startswith(f"fedpeft/{FLEET}/update/"), "the stale site sent an update"
        assert seen_notice is not None and seen_notice.bundle_id == fleet_id and seen_notice.fleet == FLEET
        assert needs is not None and needs.detail == fleet_id
        assert svc.core.accepted_this_round == 0 and svc.core.round == 0

        # the control: a site holding the fleet's bundle trains the round
        good = site("site-good", fleet_id, idle=30.0)
        good_result = good.run(connect_timeout=10)
        assert good_result.rounds_sent == [0] and good_result.final_seen
        agg.join(30)
        assert agg_result and agg_result[0].finished  # type: ignore[attr-defined]
    finally:
        svc.stop()
        agg.join(10)
        watcher.close()


@pytest.mark.parametrize("payload", [
    b'{"v":1,"t":"bundle","fleet":"f","bundle":"abc","time":1}',            # not 64 hex
    b'{"v":1,"t":"bundle","fleet":"f","bundle":"' + b"A" * 64 + b'","time":1}',  # upper case
    b'{"v":1,"t":"bundle","fleet":"f","bundle":"' + b"a" * 64 + b'","time":1,"x":0}',  # extra key
    b'{"v":2,"t":"bundle","fleet":"f","bundle":"' + b"a" * 64 + b'","time":1}',  # wire version
    b'{"v":1,"t":"status","fleet":"f","bundle":"' + b"a" * 64 + b'","time":1}',  # kind
    b"x" * 600,                                                                  # size cap
])
def test_bundle_notice_is_decoded_as_hostile_input(payload: bytes) -> None:
    from fedpeft_edge.runtime.errors import WireError

    with pytest.raises(WireError):
        notices.decode_bundle_notice(payload)
    ok = notices.encode_bundle_notice(notices.BundleNotice("f", "a" * 64, 2.5))
    assert notices.decode_bundle_notice(ok) == notices.BundleNotice("f", "a" * 64, 2.5)


def test_a_replaced_bundle_file_is_picked_up_on_restart(made, tmp_path) -> None:
    path = tmp_path / "site.bundle"
    path.write_bytes(made["signed"].path.read_bytes())
    first = build_trainer_setup(load_agent_config(text=_site_toml(tmp_path, path, made["pub"]))).bundle_id
    # the operator drops in a new bundle (same model, other fleet) signed by the same key
    new = make_bundle(tmp_path / "new.bundle", made["gdir"], fleet="line-9")
    sign_bundle(new.path, load_private_key(made["priv_path"]))
    new.path.replace(path)
    cfg = load_agent_config(text=_site_toml(tmp_path, path, made["pub"]))
    second = build_trainer_setup(cfg).bundle_id
    assert second == new.bundle_id != first and cfg.fleet.name == "line-9"
    assert [p.name for p in (tmp_path / "state" / BUNDLES_DIR).iterdir()] == [second]  # the old one went
