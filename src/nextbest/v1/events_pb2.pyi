import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("customer_id", "product_id", "event_type", "quantity", "timestamp", "channel", "value")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    product_id: str
    event_type: str
    quantity: float
    timestamp: _timestamp_pb2.Timestamp
    channel: str
    value: float
    def __init__(self, customer_id: _Optional[str] = ..., product_id: _Optional[str] = ..., event_type: _Optional[str] = ..., quantity: _Optional[float] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., channel: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("recorded", "ignored_without_consent", "unknown_product_ids", "ignored_erased")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    IGNORED_WITHOUT_CONSENT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_ERASED_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    ignored_without_consent: int
    unknown_product_ids: _containers.RepeatedScalarFieldContainer[str]
    ignored_erased: int
    def __init__(self, recorded: _Optional[int] = ..., ignored_without_consent: _Optional[int] = ..., unknown_product_ids: _Optional[_Iterable[str]] = ..., ignored_erased: _Optional[int] = ...) -> None: ...
