"""Courier's own A-ASSOCIATE and A-ABORT PDUs, byte for byte against pynetdicom's.

`targets.dicomnet.scu` encodes the association request and decodes the acceptance
itself (so that sending does not import pynetdicom, pydicom and numpy); pynetdicom
is the reference here: the same request encodes to the same bytes, and pynetdicom's
acceptances (what its SCP sends) decode to what they say. The wire tests
(`tests/targets/kinds/test_dicom_wire.py`) run the same code against live peers.
"""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext as PynetdicomContext

from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.scu import (
    UserIdentity,
    abort_pdu,
    associate_rq,
    parse_associate_ac,
    propose,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
COMMITMENT = "1.2.840.10008.1.20.1"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
JPEG_LS = "1.2.840.10008.1.2.4.80"  # odd length, 22 characters + 0


def pynetdicom_rq(calling, called, contexts, max_pdu, identity=None, roles=()):
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title = calling
    rq.called_ae_title = called
    proposed = []
    for cx in contexts:
        theirs = PynetdicomContext()
        theirs.context_id = cx.context_id
        theirs.abstract_syntax = cx.abstract_syntax
        theirs.transfer_syntax = list(cx.transfer_syntax)
        proposed.append(theirs)
    rq.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_version = ImplementationVersionNameNotification()
    impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    rq.user_information = [max_length, impl_uid, impl_version]
    for sop_class, scu, scp in roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = sop_class
        role.scu_role, role.scp_role = scu, scp
        rq.user_information.append(role)
    if identity is not None:
        rq.user_information.append(identity.primitive())
    return A_ASSOCIATE_RQ(rq).encode()


@pytest.mark.parametrize(
    "contexts, max_pdu, identity, roles",
    [
        ([(CT, [EXPLICIT, IMPLICIT])], 131072, None, ()),
        ([(CT, [JPEG_LS]), (MR, [EXPLICIT]), (CT, [IMPLICIT])], 0, None, ()),
        ([(CT, [EXPLICIT])], 16384, UserIdentity("radiology"), ()),
        ([(CT, [EXPLICIT])], 16384, UserIdentity("rad", "pässwörd"), ()),
        (
            [(COMMITMENT, [EXPLICIT, IMPLICIT])],
            65536,
            None,
            [(COMMITMENT, False, True)],
        ),
        ([(f"1.2.3.{i}", [IMPLICIT]) for i in range(128)], 4096, None, ()),
    ],
)
def test_the_association_request_is_pynetdicoms_byte_for_byte(
    contexts, max_pdu, identity, roles
):
    proposed = propose(contexts)
    ours = associate_rq(
        calling_aet="COURIER",
        called_aet="ORTHANC_16CHARSX",
        contexts=proposed,
        max_pdu=max_pdu,
        identity=identity,
        roles=roles,
    )
    theirs = pynetdicom_rq(
        "COURIER", "ORTHANC_16CHARSX", proposed, max_pdu, identity, roles
    )
    assert ours == theirs


def pynetdicom_ac(results, max_pdu):
    ac = A_ASSOCIATE()
    ac.application_context_name = "1.2.840.10008.3.1.1.1"
    ac.calling_ae_title = "COURIER"
    ac.called_ae_title = "STORESCP"
    ac.result = 0x00
    answers = []
    for context_id, result, syntax in results:
        cx = PynetdicomContext()
        cx.context_id = context_id
        cx.result = result
        cx.transfer_syntax = [syntax] if syntax else []
        answers.append(cx)
    ac.presentation_context_definition_results_list = answers
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = "1.2.3.4"
    ac.user_information = [max_length, impl_uid]
    return A_ASSOCIATE_AC(ac).encode()


def test_an_acceptance_decodes_to_its_results_and_maximum():
    pdu = pynetdicom_ac(
        [(1, 0, EXPLICIT), (3, 3, IMPLICIT), (5, 4, EXPLICIT), (7, 0, JPEG_LS)], 16384
    )
    answer = parse_associate_ac(pdu)
    assert answer.max_pdu == 16384
    assert answer.results == {
        1: (0, EXPLICIT),
        3: (3, IMPLICIT),
        5: (4, EXPLICIT),
        7: (0, JPEG_LS),
    }
    assert parse_associate_ac(pynetdicom_ac([(1, 0, IMPLICIT)], 0)).max_pdu == 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda pdu: pdu[:60],  # shorter than the fixed fields
        lambda pdu: pdu[:-3],  # the last item cut
        # the first item's length made to run past the end
        lambda pdu: pdu[:76] + struct.pack(">H", 0xFFFF) + pdu[78:],
        # the maximum length sub-item with a 3-byte value
        lambda pdu: pdu.replace(b"\x51\x00\x00\x04", b"\x51\x00\x00\x03"),
    ],
)
def test_a_malformed_acceptance_is_refused(damage):
    pdu = pynetdicom_ac([(1, 0, EXPLICIT)], 16384)
    with pytest.raises(ValueError):
        parse_associate_ac(damage(pdu))


def test_the_abort_is_pynetdicoms():
    pdu = A_ABORT_RQ()
    pdu.source, pdu.reason_diagnostic = 0x00, 0x00
    assert abort_pdu() == pdu.encode()


@pytest.mark.parametrize(
    "title", ["", "    ", "SEVENTEEN_CHARS_X", "A\\B", "TAB\tX", "Ä"]
)
def test_an_ae_title_no_peer_could_take_is_refused_before_a_byte_is_sent(title):
    with pytest.raises(ValueError, match="AE title"):
        associate_rq(
            calling_aet="COURIER",
            called_aet=title,
            contexts=propose([(CT, [IMPLICIT])]),
            max_pdu=16384,
        )
