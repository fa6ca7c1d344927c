"""Terraform's AWS provider, unmodified, against `xxctl up`: a function created with the
class as a tag, a second plan that finds nothing to change, the tag changed (and with it
the priority the handler runs at), and the function destroyed.

Terraform comes with the machine (`/usr/local/bin/terraform`, the provider in a filesystem
mirror at /opt/tf-plugins: this closed network reaches no Terraform registry). Where either
is missing the test says so and skips; it is not counted as passing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.host.test_gateway import APP, zipped
from tests.support.xx_up import Up

MIRROR = Path("/opt/tf-plugins")
PROVIDER = "5.100.0"
TERRAFORM = shutil.which("terraform")

pytestmark = pytest.mark.skipif(
    TERRAFORM is None or not (MIRROR / "registry.terraform.io/hashicorp/aws").is_dir(),
    reason="terraform or its provider mirror (/opt/tf-plugins) is not on this machine",
)

MAIN = """
terraform {{
  required_providers {{
    aws = {{ source = "hashicorp/aws", version = "{provider}" }}
  }}
}}
provider "aws" {{
  region                      = "us-east-1"
  shared_credentials_files    = ["{credentials}"]
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  endpoints {{ lambda = "{endpoint}" }}
}}
resource "aws_lambda_function" "home" {{
  function_name    = "tf-home"
  role             = "arn:aws:iam::123456789012:role/x"
  runtime          = "python3.11"
  handler          = "app.handler"
  filename         = "{zip}"
  source_code_hash = filebase64sha256("{zip}")
  tags             = {{ "xx:class" = "{cls}" }}
}}
"""


def test_terraform_applies_plans_clean_retags_and_destroys(tmp_path):
    up = Up(tmp_path / "state").start()
    try:
        work = tmp_path / "tf"
        work.mkdir()
        (work / "fn.zip").write_bytes(zipped({"app.py": APP}))
        rc = work / "terraformrc"
        rc.write_text(
            f'provider_installation {{\n  filesystem_mirror {{ path = "{MIRROR}" }}\n}}\n'
        )
        env = dict(os.environ, TF_CLI_CONFIG_FILE=str(rc), TF_IN_AUTOMATION="1",
                   CHECKPOINT_DISABLE="1")  # fmt: skip

        def tf(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([TERRAFORM, *args, "-no-color"], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip

        def write(cls: str) -> None:
            (work / "main.tf").write_text(MAIN.format(
                provider=PROVIDER, credentials=up.credentials, endpoint=up.endpoint,
                zip=work / "fn.zip", cls=cls))  # fmt: skip

        lam = up.client()

        def run_policy() -> int:
            r = lam.invoke(FunctionName="tf-home", Payload=b"{}")
            return json.loads(r["Payload"].read())["policy"]

        write("high")
        r = tf("init", "-input=false")
        assert r.returncode == 0, r.stdout + r.stderr
        r = tf("apply", "-auto-approve", "-input=false")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 added" in r.stdout
        assert run_policy() == os.SCHED_FIFO
        # a second plan finds the function as Terraform left it: exit code 0, not 2
        r = tf("plan", "-detailed-exitcode", "-input=false")
        assert r.returncode == 0, r.stdout + r.stderr
        write("low")
        r = tf("apply", "-auto-approve", "-input=false")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 changed" in r.stdout
        assert run_policy() == os.SCHED_BATCH
        r = tf("destroy", "-auto-approve", "-input=false")
        assert r.returncode == 0, r.stdout + r.stderr
        with pytest.raises(ClientError) as e:
            lam.get_function(FunctionName="tf-home")
        assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
    finally:
        assert up.stop() == 0
