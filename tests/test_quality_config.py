"""The data-quality alert policy comes from server.toml: its three settings reach the policy the
drift views and alerts judge features with, and nonsensical values are refused at start."""

from __future__ import annotations

import pytest

from fleet_server.config import CONFIG_FILE, ConfigError, load_config
from fleet_server.data_quality import QualityPolicy
from fleet_server.monitoring_service import quality_policy
from fleet_server.service import bootstrap


def test_server_toml_sets_the_quality_policy(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(
        "quality_warn_share = 0.02\nquality_alert_share = 0.1\nquality_min_rows = 40\n")
    svc = bootstrap(load_config(tmp_path))
    try:
        assert quality_policy(svc) == QualityPolicy(warn_share=0.02, alert_share=0.1, min_rows=40)
    finally:
        svc.close()


def test_defaults_are_the_documented_ones(tmp_path):
    cfg = load_config(tmp_path)
    assert (cfg.quality_warn_share, cfg.quality_alert_share, cfg.quality_min_rows) == (0.05, 0.20, 100)


@pytest.mark.parametrize("toml", [
    "quality_warn_share = 0.3\nquality_alert_share = 0.2\n",  # warns above where it alerts
    "quality_warn_share = 0\n",
    "quality_alert_share = 1.5\n",
    "quality_min_rows = -1\n",
])
def test_nonsensical_quality_settings_are_refused(tmp_path, toml):
    (tmp_path / CONFIG_FILE).write_text(toml)
    with pytest.raises(ConfigError, match="quality_"):
        load_config(tmp_path)
