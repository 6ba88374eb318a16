"""The BatchNorm modes as values: names become modes, settings are checked where a mode is made."""
import pytest
import torch

from autobatch.modes import Auto, Exact, Micro, Mode, TwoPass, bn_mode


@pytest.mark.parametrize("name, kind", [("two_pass", TwoPass), ("micro", Micro), ("exact", Exact), ("auto", Auto)])
def test_a_name_is_its_mode_with_default_settings(name, kind):
    mode = bn_mode(name)
    assert type(mode) is kind and mode.name == name and str(mode) == name
    assert bn_mode(mode) is mode


def test_the_forum_scheme_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="bn must be one of .* frozen as constants"):
        bn_mode("frozen")
    with pytest.raises(ValueError, match="bn must be one of"):
        bn_mode(3)


def test_two_pass_settings_are_checked_where_they_are_given():
    assert TwoPass(phase1_memory_format=torch.channels_last).phase1_memory_format is torch.channels_last
    with pytest.raises(ValueError, match="phase1_memory_format must be None"):
        TwoPass(phase1_memory_format=torch.contiguous_format)
    assert Auto(TwoPass(precise=True)).two_pass.precise


@pytest.mark.parametrize("lockstep", [True, False])
def test_the_removed_lockstep_is_refused_with_what_to_do(lockstep):
    with pytest.raises(TypeError, match=r"lockstep .* was removed.*Drop lockstep=\.\.\."):
        TwoPass(lockstep=lockstep)


def test_the_running_mode_reads_as_its_name():
    assert Mode("exact") is Mode.EXACT and Mode.EXACT == "exact" and str(Mode.TWO_PASS) == "two_pass"
