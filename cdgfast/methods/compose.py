"""Compositions of methods, e.g. `rank1+gd` = Compose([Rank1(), GD()]).

Exactly one member computes the task loss (the member with `owns_task_loss`, e.g. GD whose task loss
covers the replay batch; the first member if none owns it); every other member contributes only its
`extra_terms` (penalties). Term names must be distinct. Every hook is forwarded to every member in
order.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .base import Method, reusable


class Compose(Method):
    def __init__(self, members: Sequence[Method], name: str = None):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"members: expected at least two methods, got {len(members)}")
        for i, m in enumerate(members):
            if not isinstance(m, Method) or isinstance(m, Compose):
                raise ValueError(f"members[{i}]: expected a single cdgfast.methods Method, got {type(m).__name__}")
        owners = [m for m in members if m.owns_task_loss]
        if len(owners) > 1:
            raise ValueError(f"members: at most one member may compute the task loss, got "
                             f"{[m.name for m in owners]}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: expected distinct methods, got {names}")
        self.members: List[Method] = members
        self.primary: Method = owners[0] if owners else members[0]
        self.name = name or "+".join(names)
        self.owns_task_loss = any(m.owns_task_loss for m in members)
        # Method.__init__ is not used: the configuration lives in the members.
        self.generator = self.primary.generator

    @property
    def config(self) -> Dict[str, object]:
        """Every member's hyperparameters as `member.key`."""
        return {f"{m.name}.{k}": v for m in self.members for k, v in m.config.items()}

    @staticmethod
    def route_overrides(member_names: Sequence[str], member_defaults: Sequence[dict], overrides: dict):
        """Split `overrides` per member: `name.key` goes to that member; a bare key goes to every
        member that has it. Unknown keys raise ValueError naming the key."""
        routed = [dict() for _ in member_names]
        for key, value in overrides.items():
            if "." in key:
                mname, sub = key.split(".", 1)
                if mname not in member_names or sub not in member_defaults[member_names.index(mname)]:
                    raise ValueError(f"{key!r}: unknown hyperparameter for {'+'.join(member_names)}; expected "
                                     f"'<member>.<key>' with member in {list(member_names)} and a key it has")
                routed[member_names.index(mname)][sub] = value
                continue
            hit = [i for i, d in enumerate(member_defaults) if key in d]
            if not hit:
                valid = sorted({k for d in member_defaults for k in d})
                raise ValueError(f"{key!r}: unknown hyperparameter for {'+'.join(member_names)}; expected one of {valid}")
            for i in hit:
                routed[i][key] = value
        return routed

    # hooks
    def setup(self, *, num_classes, schedule=None, device=None, parallel=None, progress=False, conditions=None):
        for m in self.members:  # one conditions object, shared: its begin_task / end_task are idempotent
            m.setup(num_classes=num_classes, schedule=schedule, device=device, parallel=parallel, progress=progress,
                    conditions=conditions)

    @property
    def conditioning(self):
        return self.primary.conditioning

    def begin_task(self, model, task=None):
        for m in self.members:
            m.begin_task(model, task)

    def loss(self, model, batch) -> Dict[str, torch.Tensor]:
        terms = dict(self.primary.loss(model, batch))
        for m in self.members:
            if m is self.primary:
                continue
            m.start_step(model)  # its own opening; only its penalties are added
            for k, v in m.extra_terms(model, batch).items():
                if k in terms:
                    raise ValueError(f"term {k!r} of member {m.name!r} clashes with another member's term")
                terms[k] = v
        return terms

    def extra_terms(self, model, batch):
        out = {}
        for m in self.members:
            out.update(m.extra_terms(model, batch))
        return out

    def before_step(self, model):
        for m in self.members:
            m.before_step(model)

    def after_step(self, model):
        for m in self.members:
            m.after_step(model)

    def end_task(self, model, data):
        data = reusable(data)  # a one-shot iterator is read once and shared by the members
        for m in self.members:
            m.end_task(model, data)

    def end_last_task(self, model, data):
        data = reusable(data)
        for m in self.members:
            m.end_last_task(model, data)

    def post_task_phase(self, model, data):
        data = reusable(data)
        for m in self.members:
            m.post_task_phase(model, data)

    def restore_model_structure(self, model):
        for m in self.members:
            m.restore_model_structure(model)

    def state_dict(self):
        return {m.name: m.state_dict() for m in self.members}

    def load_state_dict(self, state):
        for m in self.members:
            m.load_state_dict(state[m.name])

    @property
    def task_index(self):
        return self.primary.task_index

    @property
    def seen_classes(self):
        return self.primary.seen_classes

    def __repr__(self):
        return f"Compose({self.name!r}, members={self.members})"
