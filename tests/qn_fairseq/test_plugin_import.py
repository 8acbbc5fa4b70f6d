"""The plugin is one module under one name (issue 22 item 15): ``import quantnoise.qn_fairseq`` and fairseq's
``--user-dir`` import (top-level ``qn_fairseq``), in either order, register the architectures once."""
import subprocess
import sys

import pytest

from conftest import ROOT

FIRST = {
    "package_first": "import quantnoise.qn_fairseq\nimport_user_dir()\n",
    "user_dir_first": "import_user_dir()\nimport quantnoise.qn_fairseq\n",
    "submodule_first": "from quantnoise.qn_fairseq.args import route_attention\nimport_user_dir()\n",
}


@pytest.mark.parametrize("order", list(FIRST))
def test_either_import_order_registers_once(order):
    script = (
        "from argparse import Namespace\n"
        "from fairseq import utils\n"
        "from quantnoise.commands.user_dir import plugin_dir\n"
        "def import_user_dir():\n"
        "    utils.import_user_module(Namespace(user_dir=str(plugin_dir())))\n"
        + FIRST[order] +
        "import sys\n"
        "import qn_fairseq, qn_fairseq.runtime, qn_fairseq.models, qn_fairseq.args\n"
        "import quantnoise.qn_fairseq.runtime as r, quantnoise.qn_fairseq.models as m\n"
        "from quantnoise.qn_fairseq.args import route_attention\n"
        "assert quantnoise.qn_fairseq is qn_fairseq and r is qn_fairseq.runtime and m is qn_fairseq.models\n"
        "assert route_attention is qn_fairseq.args.route_attention\n"
        "from quantnoise.runtime import fairseq_plugin\n"
        "assert fairseq_plugin() is qn_fairseq.runtime\n"
        "from fairseq.models import ARCH_MODEL_REGISTRY\n"
        "assert 'qn_transformer_lm' in ARCH_MODEL_REGISTRY\n"
        "assert not [p for p in sys.path if p.rstrip('/').endswith('/quantnoise')] or 'user_dir_first' == %r\n"
        "print('ok')\n" % order)
    out = subprocess.run([sys.executable, "-c", "import quantnoise\n" + script], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
