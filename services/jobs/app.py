"""The one Celery app: Redis broker and result store, JSON only, one queue per kind of job.

Crash safety comes from late acknowledgement with a prefetch of 1: a worker killed mid-job never
acknowledged its message. Redis only gives such a message back after ``visibility_timeout``, which
is set far beyond the longest job (in the broker *and* result-backend options, celery issue 5935)
so that a job still running is never delivered twice; a lost worker is detected sooner by its job's
lock expiring, and its message is put back then (``services.jobs.tasks.recover_lost_jobs``).
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from .kinds import KINDS
from .settings import JobsSettings


def task_name(kind: str) -> str:
    return f"internlm.jobs.{kind}"


def make_app(settings: JobsSettings | None = None) -> Celery:
    s = JobsSettings.coerce(settings)
    app = Celery("internlm_jobs", set_as_current=False)
    transport = {"visibility_timeout": s.visibility_timeout_s}
    app.conf.update(
        broker_url=s.redis_url,
        result_backend=s.redis_url,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,   # prefork child killed: put the message back
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_queues=[Queue(k, routing_key=k) for k in KINDS],
        task_routes={task_name(k): {"queue": k, "routing_key": k} for k in KINDS},
        task_default_queue=next(iter(KINDS)),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out a Redis restart
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the job's own lock decides
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.jobs_settings = s
    return app


def send(app: Celery, kind: str, job_id: str) -> None:
    """Queue a job: the message carries only its id (the request is in the job record)."""
    app.send_task(task_name(kind), args=[job_id], task_id=job_id, queue=kind, routing_key=kind)
