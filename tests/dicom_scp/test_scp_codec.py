"""The hand-coded DIMSE and file-meta encoders agree with pynetdicom and pydicom."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

from dicom_scp.codec import (
    decode_command_set,
    decode_store_request,
    encode_command_pdus,
    encode_file_meta,
    encode_store_response,
    split_pdata,
)
from dicom_scp.header import HeaderError, parse_header

UID = "1.2.826.0.1.3680043.8.498.1234567890123456789"


def test_store_response_matches_pynetdicom_encoding() -> None:
    encoded = encode_store_response(
        message_id=7,
        sop_class_uid=MRImageStorage,
        sop_instance_uid=UID,
        status=0xA700,
        error_comment="disk\\full é and a very long comment that goes past sixty-four characters",
    )
    command = decode(io.BytesIO(encoded), True, True)
    assert command.CommandGroupLength == len(encoded) - 12
    assert command.CommandField == 0x8001
    assert command.MessageIDBeingRespondedTo == 7
    assert command.CommandDataSetType == 0x0101
    assert command.Status == 0xA700
    assert command.AffectedSOPClassUID == MRImageStorage
    assert command.AffectedSOPInstanceUID == UID
    assert len(command.ErrorComment) <= 64 and "\\" not in command.ErrorComment
    success = encode_store_response(
        message_id=1, sop_class_uid=MRImageStorage, sop_instance_uid=UID, status=0
    )
    assert "ErrorComment" not in decode(io.BytesIO(success), True, True)


def test_store_request_decodes_pynetdicom_encoding() -> None:
    request = C_STORE()
    request.MessageID = 12
    request.AffectedSOPClassUID = MRImageStorage
    request.AffectedSOPInstanceUID = UID
    request.Priority = 1
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    request.DataSet = io.BytesIO(b"\x00" * 8)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    first = next(iter(message.encode_msg(1, 0)))
    _context, fragment = first.presentation_data_value_list[0]
    assert fragment[0] == 0x03
    command = decode_store_request(decode_command_set(fragment[1:]))
    assert command is not None
    assert (command.message_id, command.priority) == (12, 1)
    assert command.sop_class_uid == MRImageStorage and command.sop_instance_uid == UID
    assert command.move_originator_ae == "MOVER" and command.move_originator_id == 3
    assert command.has_dataset


def test_command_set_errors() -> None:
    with pytest.raises(ValueError, match="group"):
        decode_command_set(b"\x08\x00\x16\x00\x02\x00\x00\x00ab")
    with pytest.raises(ValueError, match="length"):
        decode_command_set(b"\x00\x00\x02\x00\xff\x00\x00\x00ab")
    echo = encode_store_response(
        message_id=1, sop_class_uid="1.2", sop_instance_uid="1.3", status=0
    )
    assert decode_store_request(decode_command_set(echo)) is None  # a response, not a request
    with pytest.raises(ValueError):
        decode_store_request({0x0100: b"\x01\x00"})  # C-STORE-RQ without its elements


def test_file_meta_makes_a_valid_part10_file(mr_files: list[Path], tmp_path: Path) -> None:
    original = dcmread(mr_files[0])
    body = encode(original, False, True)  # explicit VR little endian, as the file is
    assert body is not None
    path = tmp_path / "copy.dcm"
    path.write_bytes(
        encode_file_meta(
            sop_class_uid=original.SOPClassUID,
            sop_instance_uid=original.SOPInstanceUID,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            implementation_class_uid="1.2.3.4",
            implementation_version_name="TEST_1",
            source_ae_title="SENDER",
        )
        + body
    )
    copy = dcmread(path)
    assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert copy.file_meta.ImplementationClassUID == "1.2.3.4"
    assert copy.file_meta.ImplementationVersionName == "TEST_1"
    assert copy.file_meta.SourceApplicationEntityTitle == "SENDER"
    assert copy.file_meta.FileMetaInformationVersion == b"\x00\x01"
    assert copy.PixelData == original.PixelData


def _encoded(ds: Dataset, syntax: str) -> bytes:
    data = encode(ds, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
    assert data is not None
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_parse_header_in_every_uncompressed_syntax(mr_files: list[Path], syntax: str) -> None:
    ds = dcmread(mr_files[0])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Wade axial T1 Müller Straße"
    ds.NumberOfFrames = 1
    header = parse_header(_encoded(ds, syntax), syntax)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.sop_class_uid == MRImageStorage
    assert header.modality == "MR" and header.body_part_examined == "LEG"
    assert header.series_description == "Wade axial T1 Müller Straße"
    assert header.image_type == "ORIGINAL\\PRIMARY"
    assert (header.series_number, header.instance_number, header.number_of_frames) == (3, 1, 1)
    assert header.patient_id == "TEST01"


def test_parse_header_rejects_what_it_cannot_file(mr_files: list[Path]) -> None:
    ds = dcmread(mr_files[0])
    del ds.StudyInstanceUID
    with pytest.raises(HeaderError, match="StudyInstanceUID"):
        parse_header(_encoded(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    with pytest.raises(HeaderError):
        parse_header(b"\x01\x02\x03", DeflatedExplicitVRLittleEndian)
    with pytest.raises(HeaderError):
        parse_header(b"", ExplicitVRLittleEndian)


@pytest.mark.parametrize("max_pdu", [0, 16384, 64, 7])
def test_command_pdus_decode_with_pynetdicom_and_respect_max_pdu(max_pdu: int) -> None:
    command = encode_store_response(
        message_id=3, sop_class_uid=MRImageStorage, sop_instance_uid=UID, status=0
    )
    encoded = encode_command_pdus(5, command, max_pdu)
    fragments: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(encoded):
        length = int.from_bytes(encoded[offset + 2 : offset + 6], "big")
        if max_pdu:
            assert length <= max_pdu
        pdu = P_DATA_TF()
        pdu.decode(encoded[offset : offset + 6 + length])
        fragments += [
            (item.context_id, item.presentation_data_value)
            for item in pdu.presentation_data_value_items
        ]
        offset += 6 + length
    assert {context_id for context_id, _ in fragments} == {5}
    assert [data[0] for _, data in fragments] == [0x01] * (len(fragments) - 1) + [0x03]
    assert b"".join(data[1:] for _, data in fragments) == command


def test_split_pdata_matches_pynetdicom_and_rejects_bad_lengths() -> None:
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = []
    for context_id, data in ((1, b"\x01cmd"), (1, b"\x02dataset"), (3, b"\x03x")):
        item = PresentationDataValueItem()
        item.presentation_context_id, item.presentation_data_value = context_id, data
        pdu.presentation_data_value_items.append(item)
    body = pdu.encode()[6:]
    assert [(cid, bytes(data)) for cid, data in split_pdata(body)] == [
        (1, b"\x01cmd"), (1, b"\x02dataset"), (3, b"\x03x")
    ]
    with pytest.raises(ValueError, match="bad length"):
        split_pdata(body[:-1])
    with pytest.raises(ValueError, match="truncated"):
        split_pdata(body + b"\x00\x00")
