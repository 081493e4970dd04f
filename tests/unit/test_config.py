import subprocess
import sys

import pytest

from services.common.config import ConfigError, load_config
from services.common.settings import ComputeSettings, GatewaySettings


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_load_without_a_file():
    config = load_config(None, "gateway", GatewaySettings, environ={})
    assert config.service.listen == "127.0.0.1:50051"
    assert config.common.etcd_endpoints == ["127.0.0.1:2379"]


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key: etcd_endpoint\\b"):
        load_config(write(tmp_path, "etcd_endpoint: [x]\n"), "gateway", GatewaySettings, environ={})


def test_unknown_key_in_a_section_is_named_with_its_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key in gateway: lisen"):
        load_config(write(tmp_path, "gateway: {lisen: 1}\n"), "gateway", GatewaySettings, environ={})


def test_bad_port_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="gateway.listen: port 70000 is outside"):
        load_config(write(tmp_path, "gateway: {listen: '127.0.0.1:70000'}\n"), "gateway", GatewaySettings, environ={})


def test_other_sections_are_validated_too(tmp_path):
    with pytest.raises(ConfigError, match="compute.accel"):
        load_config(write(tmp_path, "compute: {accel: warp}\n"), "gateway", GatewaySettings, environ={})


def test_wrong_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="compute.max_vcpus_per_vm: expected a number"):
        load_config(write(tmp_path, "compute: {max_vcpus_per_vm: lots}\n"), "compute", ComputeSettings, environ={})


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "compute: {accel: kvm}\netcd_endpoints: ['127.0.0.1:1']\n")
    config = load_config(
        path,
        "compute",
        ComputeSettings,
        environ={"MVM_COMPUTE_ACCEL": "tcg", "MVM_ETCD_ENDPOINTS": "127.0.0.1:2,127.0.0.1:3"},
    )
    assert config.service.accel == "tcg"
    assert config.common.etcd_endpoints == ["127.0.0.1:2", "127.0.0.1:3"]


@pytest.mark.parametrize("service", ["gateway", "compute", "network", "snapshot", "auth", "relay"])
def test_service_exits_non_zero_with_a_clear_message_on_bad_config(tmp_path, service):
    path = write(tmp_path, f"{service}: {{listen: 'nowhere'}}\n")
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--config", path], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert f"bad configuration: {service}.listen: 'nowhere' is not host:port" in result.stderr
