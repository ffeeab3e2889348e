import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Purpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PURPOSE_UNSPECIFIED: _ClassVar[Purpose]
    PURPOSE_PERSONALIZATION: _ClassVar[Purpose]
    PURPOSE_BEHAVIORAL: _ClassVar[Purpose]
    PURPOSE_SENSITIVE: _ClassVar[Purpose]
PURPOSE_UNSPECIFIED: Purpose
PURPOSE_PERSONALIZATION: Purpose
PURPOSE_BEHAVIORAL: Purpose
PURPOSE_SENSITIVE: Purpose

class ConsentValue(_message.Message):
    __slots__ = ("purpose", "granted", "updated_at", "source")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    purpose: Purpose
    granted: bool
    updated_at: _timestamp_pb2.Timestamp
    source: str
    def __init__(self, purpose: _Optional[_Union[Purpose, str]] = ..., granted: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class SetConsentRequest(_message.Message):
    __slots__ = ("customer_id", "purpose", "granted", "source")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    purpose: Purpose
    granted: bool
    source: str
    def __init__(self, customer_id: _Optional[str] = ..., purpose: _Optional[_Union[Purpose, str]] = ..., granted: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class SetConsentResponse(_message.Message):
    __slots__ = ("consent", "changed")
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    consent: ConsentValue
    changed: bool
    def __init__(self, consent: _Optional[_Union[ConsentValue, _Mapping]] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetConsentRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class GetConsentResponse(_message.Message):
    __slots__ = ("customer_id", "consents", "erased")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CONSENTS_FIELD_NUMBER: _ClassVar[int]
    ERASED_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    consents: _containers.RepeatedCompositeFieldContainer[ConsentValue]
    erased: bool
    def __init__(self, customer_id: _Optional[str] = ..., consents: _Optional[_Iterable[_Union[ConsentValue, _Mapping]]] = ..., erased: _Optional[bool] = ...) -> None: ...

class ForgetCustomerRequest(_message.Message):
    __slots__ = ("customer_id", "source")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    source: str
    def __init__(self, customer_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ForgetCustomerResponse(_message.Message):
    __slots__ = ("customer_id", "consent_rows_deleted", "events_deleted", "already_erased")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CONSENT_ROWS_DELETED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ERASED_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    consent_rows_deleted: int
    events_deleted: int
    already_erased: bool
    def __init__(self, customer_id: _Optional[str] = ..., consent_rows_deleted: _Optional[int] = ..., events_deleted: _Optional[int] = ..., already_erased: _Optional[bool] = ...) -> None: ...

class ExportCustomerDataRequest(_message.Message):
    __slots__ = ("customer_id", "source")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    source: str
    def __init__(self, customer_id: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ExportCustomerDataChunk(_message.Message):
    __slots__ = ("section", "json", "page")
    SECTION_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    section: str
    json: str
    page: bool
    def __init__(self, section: _Optional[str] = ..., json: _Optional[str] = ..., page: _Optional[bool] = ...) -> None: ...
