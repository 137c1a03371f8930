//! The one seam between the store's queries and the two databases.
//!
//! The store's code ([`crate::store`]) is written once, as plain generic
//! code over a [`Backend`]: it builds statements as [`Sql`] (text with `$n`
//! placeholders, which sqlx gives both Postgres and SQLite, and drover's own
//! [`Param`] values), runs them through [`Exec`], and reads rows into types
//! that read from a row of either database ([`Record`], by [`from_row!`]). Each backend binds
//! a [`Param`] to its driver's type in one `match`, and supplies what must
//! differ: its claim and batched completion, how a list of ids is bound,
//! and how rollup folders take turns.

use std::borrow::Cow;
use std::fmt::Write;
use std::ops::DerefMut;

use drover_domain::model::{Completion, Lease, RunError, Time};
use drover_domain::Result;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::FromRow;
use uuid::Uuid;

use crate::store::{ClaimTerms, Claimed};
use crate::time::Ts;

/// A statement and its parameters, in order: `$1` is `params[0]`.
pub(crate) struct Sql<'a> {
    pub(crate) text: String,
    pub(crate) params: Vec<Param<'a>>,
}

impl<'a> Sql<'a> {
    /// A statement whose text names its parameters (`$1`, `$2`, …), bound
    /// in order with [`Sql::bind`].
    pub(crate) fn new(text: impl Into<String>) -> Sql<'a> {
        Sql { text: text.into(), params: Vec::new() }
    }

    /// Binds the next parameter.
    pub(crate) fn bind(mut self, value: impl ToParam<'a>) -> Sql<'a> {
        self.params.push(value.to_param());
        self
    }

    /// Appends text to a statement being built.
    pub(crate) fn push(&mut self, text: &str) -> &mut Sql<'a> {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder for `value`.
    pub(crate) fn push_bind(&mut self, value: impl ToParam<'a>) -> &mut Sql<'a> {
        self.params.push(value.to_param());
        let _ = write!(self.text, "${}", self.params.len());
        self
    }

    /// Appends `(v1, v2, …)`.
    pub(crate) fn push_tuple<V: ToParam<'a>>(&mut self, values: impl IntoIterator<Item = V>) -> &mut Sql<'a> {
        self.text.push('(');
        for (n, v) in values.into_iter().enumerate() {
            if n > 0 {
                self.text.push_str(", ");
            }
            self.push_bind(v);
        }
        self.text.push(')');
        self
    }
}

/// A value bound to a statement: drover's own, so that the store's code
/// names no driver. A null carries the type it stands for, which Postgres
/// checks.
pub(crate) enum Param<'a> {
    Null(Ty),
    Uuid(Uuid),
    Text(Cow<'a, str>),
    I64(i64),
    I32(i32),
    Bool(bool),
    Json(Cow<'a, Value>),
    Time(Time),
    Bytes(Cow<'a, [u8]>),
    /// A Postgres array of ids (see [`Backend::push_in`]).
    Uuids(Cow<'a, [Uuid]>),
}

/// The type of a [`Param`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ty {
    Uuid,
    Text,
    I64,
    I32,
    Bool,
    Json,
    Time,
    Bytes,
    Uuids,
}

/// What can be bound to a statement.
pub(crate) trait ToParam<'a> {
    const TY: Ty;
    fn to_param(self) -> Param<'a>;
}

impl<'a, T: ToParam<'a>> ToParam<'a> for Option<T> {
    const TY: Ty = T::TY;
    fn to_param(self) -> Param<'a> {
        match self {
            Some(v) => v.to_param(),
            None => Param::Null(T::TY),
        }
    }
}

impl<'a> ToParam<'a> for Uuid {
    const TY: Ty = Ty::Uuid;
    fn to_param(self) -> Param<'a> {
        Param::Uuid(self)
    }
}

impl<'a> ToParam<'a> for &'a str {
    const TY: Ty = Ty::Text;
    fn to_param(self) -> Param<'a> {
        Param::Text(Cow::Borrowed(self))
    }
}

impl<'a> ToParam<'a> for &'a String {
    const TY: Ty = Ty::Text;
    fn to_param(self) -> Param<'a> {
        Param::Text(Cow::Borrowed(self))
    }
}

impl<'a> ToParam<'a> for String {
    const TY: Ty = Ty::Text;
    fn to_param(self) -> Param<'a> {
        Param::Text(Cow::Owned(self))
    }
}

impl<'a> ToParam<'a> for i64 {
    const TY: Ty = Ty::I64;
    fn to_param(self) -> Param<'a> {
        Param::I64(self)
    }
}

impl<'a> ToParam<'a> for i32 {
    const TY: Ty = Ty::I32;
    fn to_param(self) -> Param<'a> {
        Param::I32(self)
    }
}

impl<'a> ToParam<'a> for bool {
    const TY: Ty = Ty::Bool;
    fn to_param(self) -> Param<'a> {
        Param::Bool(self)
    }
}

/// A JSON document (JSONB in Postgres, text in SQLite).
impl<'a> ToParam<'a> for &'a Value {
    const TY: Ty = Ty::Json;
    fn to_param(self) -> Param<'a> {
        Param::Json(Cow::Borrowed(self))
    }
}

impl<'a> ToParam<'a> for &RunError {
    const TY: Ty = Ty::Json;
    fn to_param(self) -> Param<'a> {
        Param::Json(Cow::Owned(serde_json::to_value(self).expect("a run error serializes")))
    }
}

impl<'a> ToParam<'a> for Ts {
    const TY: Ty = Ty::Time;
    fn to_param(self) -> Param<'a> {
        Param::Time(self.0)
    }
}

impl<'a> ToParam<'a> for &'a [u8] {
    const TY: Ty = Ty::Bytes;
    fn to_param(self) -> Param<'a> {
        Param::Bytes(Cow::Borrowed(self))
    }
}

impl<'a> ToParam<'a> for Vec<u8> {
    const TY: Ty = Ty::Bytes;
    fn to_param(self) -> Param<'a> {
        Param::Bytes(Cow::Owned(self))
    }
}

/// A Postgres array of ids.
impl<'a> ToParam<'a> for &'a [Uuid] {
    const TY: Ty = Ty::Uuids;
    fn to_param(self) -> Param<'a> {
        Param::Uuids(Cow::Borrowed(self))
    }
}

/// Reads a row struct from a row of either database, a column per field
/// of the same name (a field left out does not compile); fields after
/// `absent_is_default` take their default when the statement has no such
/// column. Written by hand, not derived: sqlx's derive brings its
/// proc-macro crate, which builds both database drivers a second time for
/// the compiler (half a minute of every clean build).
macro_rules! from_row {
    ($name:ident { $($field:ident),+ $(,)? $(; absent_is_default: $($absent:ident),+)? }) => {
        $crate::sql::from_row!(@for sqlx::postgres::PgRow, $name { $($field),+ $(; $($absent),+)? });
        $crate::sql::from_row!(@for sqlx::sqlite::SqliteRow, $name { $($field),+ $(; $($absent),+)? });
    };
    (@for $row:ty, $name:ident { $($field:ident),+ $(; $($absent:ident),+)? }) => {
        impl<'r> sqlx::FromRow<'r, $row> for $name {
            fn from_row(row: &'r $row) -> sqlx::Result<Self> {
                Ok($name {
                    $($field: sqlx::Row::try_get(row, stringify!($field))?,)+
                    $($($absent: match sqlx::Row::try_get(row, stringify!($absent)) {
                        Ok(v) => v,
                        Err(sqlx::Error::ColumnNotFound(_)) => Default::default(),
                        Err(e) => return Err(e),
                    },)+)?
                })
            }
        }
    };
}
pub(crate) use from_row;

/// A row type that either database can produce.
pub(crate) trait Record:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'static
{
}

impl<T> Record for T where T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin + 'static {}

/// Runs statements on one connection (a transaction's, or one taken from
/// the pool).
#[async_trait::async_trait]
pub(crate) trait Exec: Send {
    /// Runs a statement; the number of rows it changed.
    async fn execute(&mut self, sql: Sql<'_>) -> sqlx::Result<u64>;
    async fn fetch_all<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<Vec<R>>;
    async fn fetch_optional<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<Option<R>>;

    async fn fetch_one<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<R> {
        self.fetch_optional(sql).await?.ok_or(sqlx::Error::RowNotFound)
    }
}

/// A database drover stores in, and what its store cannot share.
#[async_trait::async_trait]
pub(crate) trait Backend: Send + Sync + Sized + 'static {
    /// `postgres` or `sqlite`.
    const NAME: &'static str;
    /// How many claims of one process run side by side
    /// ([`drover_domain::ports::Store::claim_lanes`]).
    const CLAIM_LANES: u8;
    /// Run in the transaction that queues a run, to wake other replicas.
    const NOTIFY: Option<&'static str>;
    /// Run in the transaction of a discovery change, its index bound as
    /// text, to wake other replicas' watchers.
    const NOTIFY_DISCOVERY: Option<&'static str>;
    /// Run first in a rollup fold's transaction, so that folders take
    /// turns.
    const FOLD_LOCK: &'static str;

    type Conn: Exec;
    /// A connection taken from the pool.
    type Pooled: DerefMut<Target = Self::Conn> + Send;
    /// A transaction; dropped without [`Backend::commit`], it rolls back.
    type Tx: DerefMut<Target = Self::Conn> + Send;

    async fn acquire(&self) -> sqlx::Result<Self::Pooled>;
    async fn begin(&self) -> sqlx::Result<Self::Tx>;
    async fn commit(tx: Self::Tx) -> sqlx::Result<()>;

    /// Appends `column IN` the ids.
    fn push_in<'a>(sql: &mut Sql<'a>, column: &str, ids: &'a [Uuid]);

    /// One claim on `terms`, past the cursor or from the front of the queue.
    async fn claim_batch(
        &self,
        terms: &ClaimTerms<'_>,
        limit: u32,
        after: Option<(Time, Uuid)>,
    ) -> Result<Vec<Claimed>>;

    /// A batch of completions, all or nothing but for lost leases (which
    /// get `StaleLease` while the rest commit).
    async fn complete_together(&self, batch: &[(Lease, &Completion)]) -> Result<Vec<Result<()>>>;
}
