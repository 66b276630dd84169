//! A clinical ward monitor on ringhub's embedding API: the seed scenario of nurses'
//! dashboards that watch wards, receive alerts, and see admissions as they happen.
//!
//! Hub methods (clients authenticate with an HS256 JWT whose `groups` claim lists
//! `ward:{id}` and `alert:{type}` patterns, as with `ringhub serve`):
//! - `SubscribeToWard(wardId)`: refused with a client-visible error without access;
//!   joins `ward:{id}` and sends the caller `WardStateSnapshot({wardId, patients, viewers})`.
//! - `SubscribeToAlerts(types[])`: joins `alert:{type}` for each (all or none).
//! - `AdmitPatient(wardId, patient)`: hands the admission to the backend task, which
//!   records it, then pushes `PatientAdmitted` to the ward, `AdmissionConfirmed` to
//!   every connection of the admitting user, and `Alert` to `alert:admission`.
//! - On disconnect, the viewers of each ward the connection watched get
//!   `ViewerDisconnected({wardId, connectionId, userId})`.
//!
//! Run: `cargo run --example ward_monitor -- --listen 127.0.0.1:5002 --jwt-secret s`
//! (the flags of `ringhub serve`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc, Arc, Mutex};

use clap::Parser;
use ringhub_engine::{
    Call, Caller, Hub, HubContext, HubError, LocalBoxFuture, ServeArgs, ServerBuilder, Target,
    Value,
};

const HUB: &str = "wards";

/// The flags of `ringhub serve`.
#[derive(Parser)]
#[command(name = "ward_monitor")]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// The wards' state, shared by the hub instances (one per shard) and the backend.
#[derive(Default)]
struct Wards {
    patients: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Wards {
    fn patients(&self, ward: &str) -> Vec<String> {
        let patients = self.patients.lock().unwrap_or_else(|p| p.into_inner());
        patients.get(ward).cloned().unwrap_or_default()
    }

    fn admit(&self, ward: &str, patient: &str) {
        let mut patients = self.patients.lock().unwrap_or_else(|p| p.into_inner());
        patients
            .entry(ward.to_owned())
            .or_default()
            .push(patient.to_owned());
    }
}

/// An admission on its way to the backend.
struct Admission {
    ward: String,
    patient: String,
    user: Option<String>,
    connection_id: String,
}

struct WardHub {
    wards: Arc<Wards>,
    backend: mpsc::Sender<Admission>,
    /// connection id -> the wards it views (connections stay on this shard).
    viewing: RefCell<HashMap<String, Vec<String>>>,
}

fn object(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn strings(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::Str).collect())
}

fn failed(e: impl std::fmt::Display) -> HubError {
    HubError::exception(e.to_string())
}

impl WardHub {
    fn ward_access(&self, call: &Call<'_>, ward: &str) -> Result<String, HubError> {
        let group = format!("ward:{ward}");
        if call.context.may_join(call.caller, &group) {
            Ok(group)
        } else {
            Err(HubError::exception(format!(
                "You are not authorized to view ward {ward}."
            )))
        }
    }

    async fn subscribe_to_ward(&self, call: Call<'_>) -> Result<Value, HubError> {
        call.expect_arguments(1)?;
        let ward: String = call.arg(0)?;
        let group = self.ward_access(&call, &ward)?;
        let caller = call.caller;
        call.context
            .add_to_group(HUB, &caller.connection_id, &group)
            .await
            .map_err(failed)?;
        self.viewing
            .borrow_mut()
            .entry(caller.connection_id.clone())
            .or_default()
            .push(ward.clone());
        let viewers = call.context.group_presence(HUB, &group).connections;
        let snapshot = object(vec![
            ("wardId", ward.into()),
            ("patients", strings(self.wards.patients(&group))),
            ("viewers", Value::from_u64(viewers as u64)),
        ]);
        call.context
            .send(
                HUB,
                Target::Connection(caller.connection_id.clone()),
                "WardStateSnapshot",
                vec![snapshot],
            )
            .await
            .map_err(failed)?;
        Ok(Value::Null)
    }

    async fn subscribe_to_alerts(&self, call: Call<'_>) -> Result<Value, HubError> {
        call.expect_arguments(1)?;
        let types: Vec<String> = call.arg(0)?;
        let groups: Vec<String> = types.iter().map(|t| format!("alert:{t}")).collect();
        if let Some(refused) = groups
            .iter()
            .find(|g| !call.context.may_join(call.caller, g))
        {
            return Err(HubError::exception(format!(
                "You are not authorized to receive {refused} alerts."
            )));
        }
        for group in &groups {
            call.context
                .add_to_group(HUB, &call.caller.connection_id, group)
                .await
                .map_err(failed)?;
        }
        Ok(strings(groups))
    }

    fn admit_patient(&self, call: Call<'_>) -> Result<Value, HubError> {
        call.expect_arguments(2)?;
        let ward: String = call.arg(0)?;
        let patient: String = call.arg(1)?;
        self.ward_access(&call, &ward)?;
        self.backend
            .send(Admission {
                ward,
                patient,
                user: call.caller.user_id.clone(),
                connection_id: call.caller.connection_id.clone(),
            })
            .map_err(|_| HubError::exception("The admissions backend is down."))?;
        Ok(Value::Null)
    }
}

impl Hub for WardHub {
    fn invoke<'a>(&'a self, call: Call<'a>) -> LocalBoxFuture<'a, Result<Value, HubError>> {
        Box::pin(async move {
            match call.method {
                "SubscribeToWard" => self.subscribe_to_ward(call).await,
                "SubscribeToAlerts" => self.subscribe_to_alerts(call).await,
                "AdmitPatient" => self.admit_patient(call),
                other => Err(HubError::UnknownMethod(other.to_owned())),
            }
        })
    }

    fn on_disconnected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let wards = self
                .viewing
                .borrow_mut()
                .remove(&caller.connection_id)
                .unwrap_or_default();
            for ward in wards {
                let event = object(vec![
                    ("wardId", ward.clone().into()),
                    ("connectionId", caller.connection_id.clone().into()),
                    (
                        "userId",
                        caller.user_id.clone().map_or(Value::Null, Value::Str),
                    ),
                ]);
                // Best effort: the server may be stopping.
                let _ = context
                    .send(
                        HUB,
                        Target::Group(format!("ward:{ward}")),
                        "ViewerDisconnected",
                        vec![event],
                    )
                    .await;
            }
        })
    }
}

/// The backend: records admissions and pushes the news through the hub context, from
/// a plain thread (it could as well be a tokio task or a message-queue consumer).
fn run_backend(admissions: mpsc::Receiver<Admission>, wards: Arc<Wards>, context: HubContext) {
    for admission in admissions {
        let group = format!("ward:{}", admission.ward);
        wards.admit(&group, &admission.patient);
        let admitted = object(vec![
            ("wardId", admission.ward.clone().into()),
            ("patient", admission.patient.clone().into()),
            (
                "admittedBy",
                admission.user.clone().map_or(Value::Null, Value::Str),
            ),
        ]);
        let confirmation = object(vec![
            ("wardId", admission.ward.clone().into()),
            ("patient", admission.patient.clone().into()),
        ]);
        let admitting = match admission.user {
            Some(user) => Target::User(user),
            None => Target::Connection(admission.connection_id),
        };
        let alert = object(vec![
            ("type", "admission".into()),
            ("wardId", admission.ward.into()),
            ("patient", admission.patient.into()),
        ]);
        let sends = [
            context.send(HUB, Target::Group(group), "PatientAdmitted", vec![admitted]),
            context.send(HUB, admitting, "AdmissionConfirmed", vec![confirmation]),
            context.send(
                HUB,
                Target::Group("alert:admission".into()),
                "Alert",
                vec![alert],
            ),
        ];
        for send in sends {
            if futures_executor::block_on(send).is_err() {
                return; // shutting down
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    ringhub_engine::cli::init_logging();
    let wards = Arc::new(Wards::default());
    let (backend, admissions) = mpsc::channel();
    let hub_wards = wards.clone();
    let build = move |builder: ServerBuilder| {
        builder.map_hub(HUB, move || WardHub {
            wards: hub_wards.clone(),
            backend: backend.clone(),
            viewing: RefCell::default(),
        })
    };
    let started = |server: &ringhub_engine::Server| {
        let context = server.context();
        std::thread::spawn(move || run_backend(admissions, wards, context));
    };
    ringhub_engine::cli::serve("ward_monitor", Cli::parse().serve, build, started)
}
