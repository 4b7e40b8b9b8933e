"""The fit-check table (lzn_jax/tools/fit_table.py): its rendering over hand-made reports (no compile), its verdict
bands, and how settings and the child command are spelled."""

from __future__ import annotations

import pytest

from lzn_jax.tools import fit, fit_table

GIB = 2**30


def _entry(setting, devices, global_batch, peak_gib, solver_share):
    """A run as fit_table.run_fit records it, with only the report fields the table reads."""
    report = {"global_batch": global_batch, "per_device_batch": global_batch // devices,
              "memory": {"peak": int(peak_gib * GIB)}, "flops": {"solver_share": solver_share},
              "compiler_refusal": None}
    return {"setting": setting, "devices": devices, "report": report, "error": None}


def test_verdict_bands():
    assert fit_table.verdict(50, 100, margin=0.25) == "fits (50 %)"
    assert fit_table.verdict(75, 100, margin=0.25) == "fits (75 %)"
    assert fit_table.verdict(76, 100, margin=0.25) == "borderline (76 %)"
    assert fit_table.verdict(125, 100, margin=0.25) == "borderline (125 %)"
    assert fit_table.verdict(126, 100, margin=0.25) == "does not fit (126 %)"


def test_percent_keeps_a_digit_of_tiny_shares():
    assert [fit_table.percent(x) for x in (0.143, 0.0011, 6.2e-6, 0.0)] == ["14.30 %", "0.11 %", "0.0006 %",
                                                                            "0.00 %"]


def test_table_of_hand_made_reports():
    entries = [
        _entry("imagenet_repr", 128, 8192, 20.0, 0.0123),
        _entry("cifar10_gen", 16, 2000, 20.7, 0.0011),
        _entry("cifar10_gen", 8, 2000, 36.0, 0.0007),
        _entry("cifar10_gen", 4, 2000, 70.0, 0.0011),
        {"setting": "lsun_bedroom_gen", "devices": 32, "report": None, "error": "compile stopped after 25 min"},
    ]
    lines = fit_table.render_table(entries).splitlines()
    heading = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert heading[:6] == ["setting", "global batch", "devices", "per device", "peak per device (GiB)",
                           "solver share of FLOPs"]
    assert heading[6:] == ["A100 40 GB (37.25 GiB)", "A100 / H100 80 GB (74.51 GiB)", "v5e (15.75 GiB)",
                           "v6e (31.24 GiB)", "v5p (95.73 GiB)"]
    assert lines[1] == "| " + " | ".join(["---"] * 11) + " |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    # The paper's order of settings; within one, the paper's device count first, then the others ascending.
    assert [(row[0], row[2]) for row in rows] == [("cifar10_gen", "16"), ("cifar10_gen", "4"), ("cifar10_gen", "8"),
                                                  ("lsun_bedroom_gen", "32"), ("imagenet_repr", "128")]
    rows = rows[:1] + rows[2:]
    assert rows[0] == ["cifar10_gen", "2,000", "16", "125", "20.7", "0.11 %", "fits (56 %)", "fits (28 %)",
                       "does not fit (131 %)", "fits (66 %)", "fits (22 %)"]
    # 36 GiB of 37.25: borderline on a 40 GB A100 and a v6e chip, over 2x a v5e chip.
    assert rows[1][6:] == ["borderline (97 %)", "fits (48 %)", "does not fit (229 %)", "borderline (115 %)",
                           "fits (38 %)"]
    assert rows[2] == ["lsun_bedroom_gen", "-", "32", "compile stopped after 25 min", "-", "-", "-", "-", "-", "-",
                       "-"]
    assert rows[3][3:6] == ["64", "20.0", "1.23 %"]


def test_a_chip_count_without_a_slice_has_no_tpu_verdict():
    row = fit_table.table_row(_entry("cifar10_gen", 20, 2000, 10.0, 0.001))
    assert row[6:] == ["fits (27 %)", "fits (13 %)", "no v5e-20", "no v6e-20", "no v5p-20"]
    assert 20 not in fit.TPU_GENERATIONS["v5e"].chip_counts


def test_tpu_columns_use_the_fit_checks_usable_hbm():
    memories = {target.generation: target.memory_bytes for target in fit_table.TARGETS if target.generation}
    assert memories == {name: generation.hbm_bytes for name, generation in fit.TPU_GENERATIONS.items()}


def test_settings_and_command():
    assert fit_table.parse_setting("cifar10_gen") == ("cifar10_gen", 16)
    assert fit_table.parse_setting("imagenet_repr") == ("imagenet_repr", 128)
    assert fit_table.parse_setting("cifar10_gen@8") == ("cifar10_gen", 8)
    with pytest.raises(ValueError, match="unknown setting 'digits_gen'.*cifar10_joint"):
        fit_table.parse_setting("digits_gen")
    with pytest.raises(ValueError, match="positive integer"):
        fit_table.parse_setting("cifar10_gen@0")
    command = fit_table.fit_command("afhq_cat_gen", 32, "/tmp/r.json")
    assert command[1:] == ["-m", "lzn_jax.tools.fit", "--config=configs/afhq_cat_gen.py", "--devices=32",
                           "--device_memory=40GB", "--method=cpu-estimate", "--nosolver_alone", "--json=/tmp/r.json"]
    assert "--solver_alone" in fit_table.fit_command("afhq_cat_gen", 32, "/tmp/r.json", solver_alone=True)
