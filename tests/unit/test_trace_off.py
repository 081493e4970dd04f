"""`trace_exporter: off` (services/common/config.py, services/common/observability.py): accepted by validation, and a
process configured with it has no SDK tracer provider, so its spans are no-ops; `none` still records them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from services.common.config import CommonSettings, ConfigError

PROBE = textwrap.dedent(
    """
    import sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from services.common import observability

    observability.configure("probe", "probe-1", trace_exporter=sys.argv[1])
    span = trace.get_tracer("probe").start_span("probe-span")
    print(isinstance(trace.get_tracer_provider(), TracerProvider), span.is_recording())
    """
)


@pytest.mark.parametrize("exporter", ["none", "console", "otlp", "off"])
def test_every_trace_exporter_is_accepted(exporter):
    CommonSettings(trace_exporter=exporter).validate()


def test_an_unknown_trace_exporter_is_refused():
    with pytest.raises(ConfigError, match="`off`"):
        CommonSettings(trace_exporter="disabled").validate()


@pytest.mark.parametrize(("exporter", "expected"), [("off", "False False"), ("none", "True True")])
def test_off_installs_no_tracer_provider(exporter, expected):
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, exporter], capture_output=True, text=True, timeout=60, check=True
    )
    assert probe.stdout.strip() == expected, probe.stderr
