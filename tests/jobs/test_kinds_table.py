"""The job kinds are one table (``services.jobs.kinds.KINDS``): the proto, the Celery queues, the
CLI and the console all follow it, so a kind added to one of them and not the table fails here."""
import argparse

from services.jobs.kinds import KINDS, enum_name, kind_of_enum
from services.jobs.records import STATES, state_enum_name
from services.pb import jobs_pb2


def test_every_proto_kind_has_exactly_one_entry():
    values = {name: value for name, value in jobs_pb2.JobKind.items() if value}  # UNSPECIFIED = any
    assert sorted(kind_of_enum(name) for name in values) == sorted(KINDS)
    assert sorted(enum_name(kind) for kind in KINDS) == sorted(values)
    assert len(set(values.values())) == len(values)
    # and each is a field of SubmitJobRequest's oneof, the message the check and the runner read
    oneof = jobs_pb2.SubmitJobRequest.DESCRIPTOR.oneofs_by_name["job"]
    assert sorted(f.name for f in oneof.fields) == sorted(KINDS)
    for kind in KINDS.values():
        assert callable(kind.check) and callable(kind.run) and kind.help


def test_every_proto_state_is_a_record_state():
    assert sorted(name for name, value in jobs_pb2.JobState.items() if value) == sorted(map(state_enum_name, STATES))


def test_queues_and_cli_follow_the_table():
    from services.cli import build_parser
    from services.jobs.app import make_app, task_name

    app = make_app()
    assert sorted(q.name for q in app.conf.task_queues) == sorted(KINDS)
    assert set(app.conf.task_routes) == {task_name(k) for k in KINDS}

    def sub(parser, *path):
        for name in path:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        return parser
    parser = build_parser()
    submit = next(a for a in sub(parser, "jobs", "submit")._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(submit.choices) == sorted(KINDS)
    listing = {a.dest: a for a in sub(parser, "jobs", "list")._actions}
    assert sorted(listing["kind"].choices) == sorted(KINDS)
    assert sorted(listing["state"].choices) == sorted(s.lower() for s in STATES)
