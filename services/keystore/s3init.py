"""`encinfer s3-init`: prepares object storage for the key store, once, with the root credentials.

It creates the bucket, a MinIO user for the key store and a policy that lets that
user touch only that bucket. The root credentials exist only in this one-shot step
(compose's `s3-init` service, `encinfer stack up`); the key store runs with its own
user, and the inference service gets no storage credential at all.

Every step is idempotent: an existing bucket, user or policy is fine, so the command
can run on every `docker compose up`. The user's secret is (re)set to the configured
one, which is how a rotated secret reaches MinIO.

Environment (the key store's own S3 variables, plus the root credentials):
ENCINFER_S3_ENDPOINT, ENCINFER_S3_SECURE, ENCINFER_S3_CA_FILE, ENCINFER_S3_REGION,
ENCINFER_S3_BUCKET, ENCINFER_S3_ACCESS_KEY and ENCINFER_S3_SECRET_KEY (the key
store's user), ENCINFER_S3_ROOT_USER and ENCINFER_S3_ROOT_PASSWORD (falling back to
MINIO_ROOT_USER and MINIO_ROOT_PASSWORD).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import certifi
import urllib3
from minio import Minio, MinioAdmin
from minio.credentials import StaticProvider
from minio.error import MinioAdminException, S3Error
from minio.helpers import check_bucket_name

from encinfer.common.env import env_float, env_str
from encinfer.common.errors import EncinferError, FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable
from encinfer.keystore.config import S3Settings
from encinfer.keystore.storage import BUSY_CODES

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ENDPOINT = S3Settings.endpoint
DEFAULT_BUCKET = S3Settings.bucket
# MinIO's own limits on IAM users (checked here to fail with a clear message).
ACCESS_KEY_LENGTH = (3, 20)
SECRET_KEY_LENGTH = (8, 40)

# Everything the key store does with its bucket: head/list, get/stat, put (multipart
# included), delete, and cleaning up multipart uploads a crash left behind. Nothing else:
# no other bucket, no bucket creation or deletion, no policy changes.
BUCKET_ACTIONS = ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"]
OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                  "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]


@dataclass(frozen=True)
class S3InitConfig:
    endpoint: str = DEFAULT_ENDPOINT
    secure: bool = False
    ca_file: str = ""
    region: str = ""
    bucket: str = DEFAULT_BUCKET
    access_key: str = ""
    secret_key: str = ""
    root_user: str = ""
    root_password: str = ""
    # How long to wait for the endpoint to answer (compose starts us right after
    # MinIO reports healthy, `stack up` right after it listens).
    wait_seconds: float = 30.0

    @classmethod
    def from_env(cls) -> S3InitConfig:
        """The key store's S3 settings (read by S3Settings, one place), plus the root credentials."""
        s3 = S3Settings.from_env()
        return cls(
            endpoint=s3.endpoint, secure=s3.secure, ca_file=s3.ca_file, region=s3.region, bucket=s3.bucket,
            access_key=s3.access_key, secret_key=s3.secret_key,
            root_user=env_str("ENCINFER_S3_ROOT_USER", "") or env_str("MINIO_ROOT_USER", ""),
            root_password=env_str("ENCINFER_S3_ROOT_PASSWORD", "") or env_str("MINIO_ROOT_PASSWORD", ""),
            wait_seconds=env_float("ENCINFER_S3_INIT_WAIT", cls.wait_seconds),
        )

    @property
    def policy_name(self) -> str:
        return f"encinfer-keystore-{self.bucket}"

    def check(self) -> None:
        """Refuses a configuration that would fail half-way or weaken the separation of credentials."""
        missing = [name for name, value in (
            ("ENCINFER_S3_ROOT_USER", self.root_user), ("ENCINFER_S3_ROOT_PASSWORD", self.root_password),
            ("ENCINFER_S3_ACCESS_KEY", self.access_key), ("ENCINFER_S3_SECRET_KEY", self.secret_key)) if not value]
        if missing:
            raise InvalidArgument(f"s3-init needs {', '.join(missing)}")
        if self.access_key == self.root_user:
            raise InvalidArgument("the key store's access key must differ from the root user: "
                                  "the key store gets its own, bucket-limited user")
        try:
            check_bucket_name(self.bucket)
        except ValueError:
            raise InvalidArgument(f"ENCINFER_S3_BUCKET={self.bucket!r} is not a valid bucket name "
                                  "(3 to 63 lower-case letters, digits, dots and hyphens)") from None
        lo, hi = ACCESS_KEY_LENGTH
        if not lo <= len(self.access_key) <= hi:
            raise InvalidArgument(f"ENCINFER_S3_ACCESS_KEY must be {lo} to {hi} characters long (a MinIO limit)")
        lo, hi = SECRET_KEY_LENGTH
        if not lo <= len(self.secret_key) <= hi:
            raise InvalidArgument(f"ENCINFER_S3_SECRET_KEY must be {lo} to {hi} characters long (a MinIO limit)")


@dataclass(frozen=True)
class S3InitResult:
    bucket: str
    bucket_created: bool
    user: str
    user_created: bool
    policy: str


def keystore_policy(bucket: str) -> dict:
    """The IAM policy of the key store's user: its one bucket, the actions it uses, nothing more."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": BUCKET_ACTIONS, "Resource": [f"arn:aws:s3:::{bucket}"]},
            {"Effect": "Allow", "Action": OBJECT_ACTIONS, "Resource": [f"arn:aws:s3:::{bucket}/*"]},
        ],
    }


def _http_client(config: S3InitConfig) -> urllib3.PoolManager:
    # The SDK's default client retries for minutes; we retry ourselves, bounded, with a clear message.
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=30),
        retries=urllib3.Retry(total=0),
        cert_reqs="CERT_REQUIRED",
        ca_certs=config.ca_file or os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


def init_storage(config: S3InitConfig) -> S3InitResult:
    """Creates (or confirms) the bucket, the key store's user and its bucket-only policy."""
    config.check()
    http = _http_client(config)
    root = Minio(endpoint=config.endpoint, access_key=config.root_user, secret_key=config.root_password,
                 secure=config.secure, region=config.region or None, http_client=http)
    admin = MinioAdmin(endpoint=config.endpoint, credentials=StaticProvider(config.root_user, config.root_password),
                       region=config.region, secure=config.secure, http_client=http)
    call = _Steps(config)

    exists = call(lambda: root.bucket_exists(bucket_name=config.bucket))
    if not exists:
        call(lambda: _make_bucket(root, config))
        log.info("bucket created", extra={"fields": {"bucket": config.bucket}})

    user_created = not call(lambda: _user_exists(admin, config))
    call(lambda: admin.user_add(access_key=config.access_key, secret_key=config.secret_key))
    call(lambda: admin.policy_add(policy_name=config.policy_name, policy=keystore_policy(config.bucket)))
    call(lambda: _attach_policy(admin, config))
    _warn_on_extra_policies(json.loads(call(lambda: admin.user_info(access_key=config.access_key)) or "{}"), config)
    log.info("key store user ready", extra={"fields": {
        "bucket": config.bucket, "user": config.access_key, "user_created": user_created,
        "policy": config.policy_name}})
    return S3InitResult(bucket=config.bucket, bucket_created=not exists, user=config.access_key,
                        user_created=user_created, policy=config.policy_name)


# What a MinIO that is still starting answers, to S3 and admin calls alike (MinIO's
# cmd/api-errors.go): a distributed MinIO serves some calls before its IAM and bucket
# metadata are loaded, and before all its nodes are up (no write quorum yet). Waited
# out within the deadline; past it the same answer is the error, with its reason.
_NOT_READY_CODES = BUSY_CODES | {"XMinioIAMNotInitialized", "XMinioBucketMetadataNotInitialized",
                                  "XMinioAdminConfigNoQuorum"}


class _Steps:
    """Runs each S3 or admin step, waiting out a server that is not up yet (no answer, or
    "not initialized") until one deadline `wait_seconds` from the first step; any other
    failure becomes, at once, an error that says what to fix."""

    def __init__(self, config: S3InitConfig) -> None:
        self.config = config
        self.deadline = time.monotonic() + config.wait_seconds

    def __call__(self, fn: Callable[[], T]) -> T:
        while True:
            try:
                return fn()
            except S3Error as exc:
                error, ready = _s3_error(exc, self.config), exc.code not in _NOT_READY_CODES
            except MinioAdminException as exc:
                error, ready = _admin_error(exc, self.config), _admin_code(exc) not in _NOT_READY_CODES
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error, ready = Unavailable(f"S3 endpoint {self.config.endpoint} did not answer: {exc}"), False
            if ready:
                raise error from None
            if time.monotonic() >= self.deadline:
                raise type(error)(f"{error} (still so after waiting {self.config.wait_seconds:g} s)") from None
            time.sleep(0.5)


def _make_bucket(root: Minio, config: S3InitConfig) -> None:
    """Creates the bucket; one this step already created (a retry after an answer that came
    back "not initialized" although the bucket was made) is fine."""
    try:
        root.make_bucket(bucket_name=config.bucket, location=config.region or None)
    except S3Error as exc:
        if exc.code != "BucketAlreadyOwnedByYou":
            raise


def _user_exists(admin: MinioAdmin, config: S3InitConfig) -> bool:
    try:
        admin.user_info(access_key=config.access_key)
        return True
    except MinioAdminException as exc:
        if _admin_code(exc) == "XMinioAdminNoSuchUser":
            return False
        raise


def _attach_policy(admin: MinioAdmin, config: S3InitConfig) -> None:
    try:
        admin.attach_policy(policies=[config.policy_name], user=config.access_key)
    except MinioAdminException as exc:
        if _admin_code(exc) != "XMinioAdminPolicyChangeAlreadyApplied":
            raise


def _warn_on_extra_policies(info: dict, config: S3InitConfig) -> None:
    attached = [p for p in str(info.get("policyName", "")).split(",") if p]
    extra = sorted(set(attached) - {config.policy_name})
    if extra:
        # Someone granted more by hand; we don't take it away silently, but say so.
        log.warning("key store user has more policies than it needs", extra={"fields": {
            "user": config.access_key, "extra_policies": extra}})


_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "XMinioInvalidIAMCredentials", "AccessDenied"}


def _s3_error(exc: S3Error, config: S3InitConfig) -> EncinferError:
    if exc.code in _AUTH_CODES:
        return Unauthenticated(f"S3 endpoint {config.endpoint} refused the root credentials ({exc.code})")
    return FailedPrecondition(f"S3 endpoint {config.endpoint}: {exc.code}: {exc.message}")


def _admin_code(exc: MinioAdminException) -> str:
    try:
        return str(json.loads(exc._body).get("Code", ""))
    except (ValueError, AttributeError):
        return ""


def _admin_error(exc: MinioAdminException, config: S3InitConfig) -> EncinferError:
    code = _admin_code(exc)
    try:
        message = json.loads(exc._body).get("Message", "")
    except (ValueError, AttributeError):
        message = str(exc._body)[:200]
    if code in _AUTH_CODES:
        return Unauthenticated(f"MinIO admin API at {config.endpoint} refused the root credentials ({code})")
    if exc._code == "404" and not code:
        return FailedPrecondition(f"{config.endpoint} has no MinIO admin API: s3-init needs MinIO")
    return FailedPrecondition(f"MinIO admin API at {config.endpoint}: {code or exc._code}: {message}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("s3-init", help="create the key store's bucket, MinIO user and bucket-only policy (idempotent)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wait", type=float, default=None, help="seconds to wait for the endpoint (ENCINFER_S3_INIT_WAIT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encinfer.common import logs

    logs.configure()
    config = S3InitConfig.from_env()
    if args.wait is not None:
        config = S3InitConfig(**{**config.__dict__, "wait_seconds": args.wait})
    try:
        init_storage(config)
    except EncinferError as exc:
        log.error("s3-init failed", extra={"fields": {"error": str(exc), "code": exc.code}})
        return 1
    return 0
