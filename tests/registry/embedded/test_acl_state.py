"""ACL policies and tokens as state: the plans (pure), their refusals, and the round trip through
the log codec and a snapshot, indexes included."""

from __future__ import annotations

import pytest

from meshd.registry.embedded.state import RegistryState
from meshd.registry.embedded.store.acl import ANONYMOUS_ACCESSOR, MANAGEMENT_POLICY_ID
from meshd.registry.embedded.store.records import ApiError, Mutation, op_from_json, op_to_json

ACCESSOR = "3f7f0e1c-5b7a-4a51-9a0e-8b1c2d3e4f50"
SECRET = "9d0f2a3b-1c4d-4e5f-8a6b-7c8d9e0f1a2b"


def _apply(state: RegistryState, mutation: Mutation) -> Mutation:
    # through the log codec, as a replay would see it
    ops = tuple(op_from_json(op_to_json(op)) for op in mutation.ops)
    state.apply(Mutation(index=mutation.index, ops=ops), 0.0)
    return mutation


def _booted() -> RegistryState:
    state = RegistryState()
    _apply(state, state.plan_acl_boot(initial_management=None, initial_accessor="x",
                                      created="2026-01-01T00:00:00Z"))
    return state


def test_boot_creates_the_builtin_policy_and_anonymous_token_once() -> None:
    state = _booted()
    assert state.acl_policies[MANAGEMENT_POLICY_ID].name == "global-management"
    assert state.token_by_secret("anonymous") is state.acl_tokens[ANONYMOUS_ACCESSOR]
    assert state.acl_bootstrap is None
    again = state.plan_acl_boot(initial_management=None, initial_accessor="x", created="")
    assert again.ops == ()


def test_bootstrap_once_then_refused_with_the_reset_index() -> None:
    state = _booted()
    done = _apply(state, state.plan_acl_bootstrap(accessor=ACCESSOR, secret=SECRET,
                                                  created="t"))
    assert done.result.policies == (MANAGEMENT_POLICY_ID,)
    with pytest.raises(ApiError) as caught:
        state.plan_acl_bootstrap(accessor=ACCESSOR, secret=SECRET, created="t")
    assert (caught.value.status, caught.value.text) == (
        403, f"Permission denied: ACL bootstrap no longer allowed (reset index: {done.index})")


@pytest.mark.parametrize(("definition", "text"), [
    ({}, "Invalid Policy: no Name is set"),
    ({"Name": "a b"}, "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' "
                      "are allowed"),
    ({"Name": "global-management"},
     'Invalid Policy: A Policy with Name "global-management" already exists'),
    ({"Name": "p", "Rules": 'key "k" { policy = "nope" }'}, "Invalid key policy: "),
])
def test_policy_refusals(definition: dict[str, str], text: str) -> None:
    with pytest.raises(ApiError) as caught:
        _booted().plan_policy_set(definition, new_id=ACCESSOR)
    assert caught.value.status == 500 and caught.value.text.startswith(text)


def test_snapshot_round_trip_keeps_tokens_policies_and_indexes() -> None:
    state = _booted()
    policy = _apply(state, state.plan_policy_set(
        {"Name": "readers", "Rules": 'key_prefix "" { policy = "read" }'},
        new_id="11111111-2222-3333-4444-555555555555")).result
    token = _apply(state, state.plan_token_set(
        {"Policies": [{"Name": "readers"}]}, create=True, new_accessor=ACCESSOR,
        new_secret=SECRET, created="t")).result
    _apply(state, state.plan_acl_bootstrap(accessor="a" * 8 + "-0000-4000-8000-" + "0" * 12,
                                           secret="s", created="t"))
    restored = RegistryState()
    restored.restore(state.records(), state.indexes())
    assert restored.acl_tokens == state.acl_tokens
    assert restored.acl_policies[policy.id] == policy
    assert restored.token_by_secret(SECRET) == token
    assert restored.acl_bootstrap == state.acl_bootstrap
    assert restored.index == state.index and restored.table("acl") == state.table("acl")
