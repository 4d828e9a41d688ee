"""`precision: auto` and friends with faked capabilities and timings: which variants are candidates on
which CPU or GPU, and which one wins. No real timing is asserted here."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from handlers import autoselect
from handlers.accuracy import AccuracyRefused, Verdict
from handlers.autoselect import Settings, Trial, candidates, choose, only, pick, ranked, run_trials
from handlers.capabilities import Capabilities, capped_flags, cpu_capabilities, this_cpu
from handlers.runtimes import Artefacts, Variant, VariantUnavailable, load

# torch.cpu.get_capabilities() as three kinds of machine report it (only the flags that matter here)
SAPPHIRE_RAPIDS = {"cpu_name": "Xeon AMX", "amx_tile": True, "amx_bf16": True, "amx_int8": True,
                   "avx512_bf16": True, "avx512_vnni": True, "avx512_f": True, "avx2": True}
CASCADE_LAKE = {"cpu_name": "Xeon VNNI", "amx_tile": False, "avx512_bf16": False, "avx512_vnni": True,
                "avx512_f": True, "avx2": True}
OLD_LAPTOP = {"cpu_name": "no AVX2", "avx2": False}


def test_bf16_is_measured_only_where_the_cpu_runs_it_natively() -> None:
    assert cpu_capabilities(SAPPHIRE_RAPIDS).precisions() == ["fp32", "bf16"]
    assert cpu_capabilities(CASCADE_LAKE).precisions() == ["fp32"]  # bf16 would be emulated: never tried
    assert cpu_capabilities({**CASCADE_LAKE, "avx512_bf16": True}).precisions() == ["fp32", "bf16"]
    assert cpu_capabilities(CASCADE_LAKE).fast_int8 and not cpu_capabilities(OLD_LAPTOP).fast_int8


def test_gpu_precisions_follow_the_compute_capability() -> None:
    assert Capabilities("cuda", "H200", cuda=(9, 0)).precisions() == ["fp32", "bf16", "fp16"]
    assert Capabilities("cuda", "T4", cuda=(7, 5)).precisions() == ["fp32", "fp16"]
    assert not Capabilities("cuda", "H200", cuda=(9, 0)).fast_int8


def test_this_machine_is_detected_from_torch() -> None:
    detected = autoselect.Capabilities  # the type the handler gets
    caps = cpu_capabilities(torch.cpu.get_capabilities())
    assert isinstance(caps, detected) and caps.device == "cpu" and "fp32" in caps.precisions()


@pytest.fixture()
def archive(tmp_path: Path) -> Artefacts:
    """An unpacked archive's files as the export writes them: fp32 TorchScript plus every variant, with an
    int8 TorchScript file that missed its accuracy bound on the export machine."""
    entries = {"int8": {"file": "m.int8.pt", "within_bound": False}, "onnx": {"file": "m.onnx"},
               "onnx-int8": {"file": "m.int8.onnx", "within_bound": True}, "aotinductor": {"file": "m.pt2"}}
    for name in ["m.pt", *(e["file"] for e in entries.values())]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "export.json").write_text(json.dumps({"artefacts": entries}))
    return Artefacts.read(tmp_path, "m.pt")


def names(variants: list[Variant]) -> list[str]:
    return [v.name for v in variants]


def test_auto_candidates_on_a_cpu_without_amx(archive: Artefacts) -> None:
    found = candidates(Settings(), cpu_capabilities(CASCADE_LAKE), archive)
    # no bf16 (emulated); the int8 file that missed its bound on the export machine is still a candidate: the
    # serving machine's own held-out check decides (handlers/accuracy.py)
    assert names(found) == ["torchscript-fp32", "torchscript-fp32+fusion", "torchscript-int8", "onnxruntime-fp32",
                            "onnxruntime-int8", "aotinductor-fp32"]


def test_auto_candidates_on_an_amx_cpu_include_bf16(archive: Artefacts) -> None:
    found = names(candidates(Settings(), cpu_capabilities(SAPPHIRE_RAPIDS), archive))
    assert found[:4] == ["torchscript-fp32", "torchscript-fp32+fusion", "torchscript-bf16", "torchscript-bf16+fusion"]


def test_a_named_setting_wins(archive: Artefacts) -> None:
    cpu = cpu_capabilities(CASCADE_LAKE)
    assert names(candidates(Settings(precision="bf16", fusion="true"), cpu, archive)) == ["torchscript-bf16+fusion"]
    # named explicitly, an int8 export is the one candidate (then checked on the held-out inputs at worker start)
    assert names(candidates(Settings(backend="torchscript", precision="int8"), cpu, archive)) == ["torchscript-int8"]
    assert names(candidates(Settings(backend="onnxruntime", precision="fp32"), cpu, archive)) == ["onnxruntime-fp32"]


def test_missing_files_are_not_candidates(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"")
    only_torchscript = Artefacts.read(tmp_path, "m.pt")
    assert names(candidates(Settings(), cpu_capabilities(CASCADE_LAKE), only_torchscript)) == [
        "torchscript-fp32", "torchscript-fp32+fusion"]
    assert candidates(Settings(backend="aotinductor"), cpu_capabilities(CASCADE_LAKE), only_torchscript) == []


@pytest.mark.parametrize(("key", "value", "message"), [
    ("precision", "fp8", "handler.precision is 'fp8'; expected one of fp32, fp16, bf16, int8, auto"),
    ("backend", "tensorrt",
     "handler.backend is 'tensorrt'; expected one of torchscript, onnxruntime, aotinductor, auto"),
    ("onednn_fusion", "yes", "handler.onednn_fusion is 'yes'; expected one of true, false, auto"),
    ("reduced_precision", "amp", "handler.reduced_precision is 'amp'; expected one of cast, autocast"),
])
def test_bad_settings_are_refused_with_the_allowed_values(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_config({key: value}, tolerance=0.01)


def trial(name: str, ms: float | None, discrepancy: float | None = 0.0) -> Trial:
    backend, precision = name.split("-")
    return Trial(Variant(backend, precision), None if ms is None else ms / 1000, discrepancy)


def test_the_fastest_within_tolerance_wins() -> None:
    trials = [trial("torchscript-fp32", 30), trial("torchscript-bf16", 12, 0.05), trial("torchscript-int8", 8, 0.004),
              trial("onnxruntime-int8", 9, 0.003)]
    assert pick(trials, tolerance=0.02, margin=0.0).variant.name == "torchscript-int8"  # bf16 is out of tolerance
    assert pick(trials, tolerance=0.1, margin=0.0).variant.name == "torchscript-int8"


def test_within_the_margin_the_earlier_simpler_variant_wins() -> None:
    trials = [trial("torchscript-fp32", 10.2), trial("onnxruntime-fp32", 10.0)]
    assert pick(trials, tolerance=0.02, margin=0.05).variant.name == "torchscript-fp32"
    assert pick(trials, tolerance=0.02, margin=0.01).variant.name == "onnxruntime-fp32"


def test_auto_never_picks_a_slower_path_than_fp32() -> None:
    trials = [trial("torchscript-fp32", 20), trial("torchscript-bf16", 55, 0.001), trial("onnxruntime-fp32", None)]
    assert pick(trials, tolerance=0.02, margin=0.05).variant.name == "torchscript-fp32"


def test_no_usable_variant_is_an_error_naming_each() -> None:
    with pytest.raises(ValueError, match="torchscript-fp32: no such file"):
        pick([Trial(Variant(), error="no such file")], tolerance=0.02, margin=0.05)


class _BackendOwnError(Exception):
    """Like onnxruntime's own exception types, which derive from none of the built-in ones checked before."""


def test_trials_compare_with_fp32_and_skip_any_variant_that_fails() -> None:
    outputs = {"torchscript-fp32": torch.tensor([1.0, 2.0]), "onnxruntime-fp32": torch.tensor([1.0, 2.5]),
               "torchscript-bf16": torch.tensor([1.0, 2.25])}
    ticks = itertools.count()

    def load(variant: Variant):
        if variant.backend == "aotinductor":
            raise VariantUnavailable("compiled for avx512; this CPU lacks avx512_f")
        if variant.precision == "int8":
            def broken(*inputs):
                raise _BackendOwnError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : kernel failed")
            return broken
        return lambda *inputs: outputs[variant.name]

    # the reference is fp32 TorchScript even when it is not a candidate and not listed first
    variants = [Variant(precision="bf16"), Variant("onnxruntime"), Variant("aotinductor"),
                Variant("onnxruntime", "int8")]
    trials = run_trials(variants, load, (torch.zeros(1),), lambda ref, out: float((ref - out).abs().max()),
                        load(Variant()), repeats=3, budget_s=0.0, clock=lambda: float(next(ticks)))
    assert [t.discrepancy for t in trials] == [0.25, 0.5, None, None]
    assert trials[0].seconds == 1.0  # the fake clock ticks once per reading
    assert trials[2].error == "VariantUnavailable: compiled for avx512; this CPU lacks avx512_f"
    assert trials[3].error == "_BackendOwnError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : kernel failed"


def test_variants_that_would_pass_the_selection_deadline_are_not_timed() -> None:
    """At the first variant's pace (10 s a call on this fake clock) timing another would end past the deadline."""
    ticks = itertools.count(step=10)
    runner = lambda *inputs: torch.ones(1)  # noqa: E731
    trials = run_trials([Variant(), Variant(precision="bf16")], lambda v: runner, (torch.zeros(1),),
                        lambda ref, out: 0.0, runner, repeats=3, budget_s=0.0, deadline=100.0,
                        clock=lambda: float(next(ticks)))
    assert trials[0].seconds == 10.0 and trials[1].seconds is None
    assert trials[1].error == "not timed: at 10.00 s a batch it would pass the selection budget"
    assert pick(trials, 0.01, 0.05).variant == Variant()


def test_workers_of_one_model_share_the_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSFORGE_CACHE_DIR", str(tmp_path))
    choice = autoselect.Choice(Variant("onnxruntime", "int8"), True, "fastest", [])
    with autoselect.shared_decision("model-a") as path:
        assert autoselect.remembered(path) is None
        autoselect.remember(path, choice)
    with autoselect.shared_decision("model-a") as path:
        assert autoselect.remembered(path) == Variant("onnxruntime", "int8")
    with autoselect.shared_decision("model-b") as path:
        assert autoselect.remembered(path) is None


class _PinnedFp32(torch.nn.Module):
    """Like traced MiniLM: the program converts an input to fp32 itself, so weights cast to bf16 cannot meet it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.float32))


def test_a_program_that_pins_fp32_runs_in_bf16_under_autocast(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    torch.jit.trace(_PinnedFp32().eval(), (x,)).save(str(tmp_path / "m.pt"))  # type: ignore[no-untyped-call]
    artefacts = Artefacts(tmp_path, "m.pt", {})
    reference = load(Variant(), artefacts, torch.device("cpu"))(x)
    with pytest.raises(RuntimeError, match="dtype"):
        load(Variant(precision="bf16"), artefacts, torch.device("cpu"))(x)  # weights cast: the program refuses
    mixed = load(Variant(precision="bf16"), artefacts, torch.device("cpu"), cast="autocast")(x)
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, reference)  # bf16 matmul: close, not equal
    torch.testing.assert_close(mixed, reference, rtol=0.05, atol=0.05)
    assert Settings.from_config({"reduced_precision": "autocast"}, tolerance=0.01).cast == "autocast"


def verdict(value: float) -> Verdict:
    return Verdict("top1_agreement", value, 0.99, 360)


def test_preference_order_is_pick_applied_to_what_is_left() -> None:
    trials = [trial("torchscript-fp32", 30), trial("torchscript-bf16", 12, 0.05), trial("torchscript-int8", 8),
              trial("onnxruntime-int8", 9), trial("onnxruntime-fp32", None)]
    assert [t.variant.name for t in ranked(trials, 0.02, 0.0)] == ["torchscript-int8", "onnxruntime-int8",
                                                                   "torchscript-fp32"]


def test_auto_serves_the_first_preferred_variant_within_the_bound() -> None:
    trials = [trial("torchscript-fp32", 30), trial("torchscript-int8", 8), trial("onnxruntime-int8", 9)]
    figures = {"torchscript-int8": 0.97, "onnxruntime-int8": 0.995}
    checked = []

    def check(runner):
        checked.append(runner)
        return verdict(figures[runner])

    for t in trials:
        t.runner = t.variant.name
    choice = choose(trials, Settings(margin=0.0), check, 8)
    assert choice.variant.name == "onnxruntime-int8" and choice.accuracy == verdict(0.995)
    assert checked == ["torchscript-int8", "onnxruntime-int8"]  # in order, and nothing slower
    assert trials[1].accuracy == verdict(0.97) and "top1_agreement 0.9950 >= 0.99" in choice.reason
    assert choice.to_json()["trials"][1]["accuracy"]["within_bound"] is False


def test_fp32_torchscript_is_the_reference_and_never_checked() -> None:
    trials = [trial("torchscript-fp32", 10), trial("torchscript-int8", 8)]
    for t in trials:
        t.runner = t.variant.name
    choice = choose(trials, Settings(margin=0.0), lambda runner: verdict(0.5), 8)
    assert choice.variant == autoselect.REFERENCE and choice.accuracy is None and not choice.below_bound


def test_a_failing_check_counts_as_out_of_bound() -> None:
    trials = [trial("torchscript-fp32", 10), trial("onnxruntime-int8", 8)]
    for t in trials:
        t.runner = t.variant.name

    def check(runner):
        raise _BackendOwnError("kernel failed on the held-out batch")

    assert choose(trials, Settings(margin=0.0), check, 8).variant == autoselect.REFERENCE
    assert trials[1].error == "_BackendOwnError: kernel failed on the held-out batch"


def test_without_fp32_among_candidates_no_variant_within_bound_is_an_error_with_the_figures() -> None:
    trials = [trial("onnxruntime-int8", 8)]
    trials[0].runner = "r"
    with pytest.raises(AccuracyRefused, match=r"onnxruntime-int8: top1_agreement 0\.9000 < 0\.99 on 360"):
        choose(trials, Settings(), lambda runner: verdict(0.9), 8)


def test_a_pinned_variant_out_of_bound_is_refused_unless_the_config_accepts_it() -> None:
    pinned = Trial(Variant("torchscript", "int8"), runner="r")
    with pytest.raises(AccuracyRefused, match=r"refusing to serve torchscript-int8: top1_agreement 0\.9000 < 0\.99"):
        only(pinned, Settings(precision="int8"), lambda runner: verdict(0.9))
    accepted = only(pinned, Settings(precision="int8", accept_lower_accuracy=True), lambda runner: verdict(0.9))
    assert accepted.below_bound and accepted.to_json()["below_bound"] is True
    within = only(pinned, Settings(precision="int8"), lambda runner: verdict(0.995))
    assert not within.below_bound and within.accuracy == verdict(0.995)
    assert only(pinned, Settings(precision="int8"), None).accuracy is None  # an archive without held-out inputs


def test_the_bound_and_its_acceptance_come_from_the_config() -> None:
    settings = Settings.from_config({"accuracy_bound": 0.95, "accept_lower_accuracy": True}, tolerance=0.01)
    assert settings.accuracy_bound == 0.95 and settings.accept_lower_accuracy is True
    assert Settings.from_config({}, tolerance=0.01).accept_lower_accuracy is False
    with pytest.raises(ValueError, match="accept_lower_accuracy is 'yes'; expected true or false"):
        Settings.from_config({"accept_lower_accuracy": "yes"}, tolerance=0.01)


def test_instruction_set_caps_remove_what_kernels_may_not_use() -> None:
    amx = {**SAPPHIRE_RAPIDS, "avx_vnni": True}
    assert cpu_capabilities(amx, aten="AVX512").precisions() == ["fp32", "bf16"]  # ATen's top level caps nothing
    assert cpu_capabilities(amx, onednn="AVX2").flags == {"avx2"}
    assert cpu_capabilities(amx, onednn="AVX2").precisions() == ["fp32"]
    assert cpu_capabilities(amx, onednn="avx512_core_vnni").precisions() == ["fp32"]  # no bf16 instructions
    assert cpu_capabilities(amx, onednn="AVX512_CORE_BF16").precisions() == ["fp32", "bf16"]
    assert cpu_capabilities(amx, onednn="AVX512_CORE_AMX").flags >= {"amx_tile", "amx_bf16", "amx_int8"}
    assert not cpu_capabilities(amx, aten="DEFAULT").fast_int8
    assert capped_flags(None) == set() and capped_flags("ALL") == set()


def test_the_decision_is_keyed_to_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU flags, caps and library versions are part of the shared decision's key."""
    from handlers.capabilities import fingerprint

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite itself may run capped (make test-isa)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    plain = fingerprint(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = fingerprint(torch.device("cpu"))
    assert plain != capped and capped["onednn_max_cpu_isa"] == "AVX2"
    assert plain["versions"]["torch"] == torch.__version__ and "onnxruntime" in plain["versions"]
    assert plain["cpu"]["cpu_name"] and any(v is True for v in plain["cpu"].values())


def test_untimed_candidates_that_fail_to_load_are_skipped() -> None:
    def load(variant: Variant):
        raise _BackendOwnError("cannot create the session")

    reference = autoselect.loaded(Variant(), load, "fp32-runner")
    broken = autoselect.loaded(Variant("onnxruntime", "int8"), load, "fp32-runner")
    assert reference.runner == "fp32-runner" and reference.seconds == 1.0
    assert broken.runner is None and broken.seconds is None
    assert broken.error == "_BackendOwnError: cannot create the session"
    assert choose([broken, reference], Settings(), None, 0).variant == autoselect.REFERENCE


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sentiment", "minilm"])
def test_every_variant_auto_offers_a_text_model_runs_on_this_cpu(model: str) -> None:
    """A variant `auto` may time must run where it is offered: bf16+fusion under autocast failed once fused
    on an AMX CPU ("expected m1 and m2 to have the same dtype, but got: double != c10::BFloat16")."""
    import yaml

    from tests.conftest import BUILD, ROOT, built_archive

    built_archive(model)
    handler = yaml.safe_load((ROOT / "config" / "models" / f"{model}.yaml").read_text()).get("handler") or {}
    settings = Settings.from_config(handler, tolerance=0.05)
    artefacts = Artefacts.read(BUILD / model, f"{model}.pt")
    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded row, as a batch of texts of different lengths has
    failed = {}
    for variant in candidates(settings, this_cpu(), artefacts):
        try:
            run = load(variant, artefacts, torch.device("cpu"), cast=settings.cast)
            for _ in range(3):  # TorchScript's profiling executor fuses on a later call, not the first
                assert torch.isfinite(run(ids, mask)).all()
        except Exception as error:  # every failure is reported, with its variant
            failed[variant.name] = str(error).splitlines()[-1][:200]
    assert not failed, failed
