//! The `aws` provider through drover's HTTP API, against a moto server on
//! loopback, cross-checked with the AWS SDK directly. Every test uses names
//! of its own: the tests share one moto and never reset it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_domain::engine::{Engine, EngineConfig, Providers};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use drover_ops::aws::testing::{base_ami, default_network, ec2, elbv2, moto_clients, moto_settings, unique};
use drover_ops::aws::Clients;
use drover_tests::{spawn_app_on_moto, spawn_app_on_moto_without_workers, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Notify;

struct Aws {
    clients: Arc<Clients>,
    ami: String,
    subnet: String,
    sg: String,
}

async fn aws() -> Aws {
    let clients = moto_clients();
    let ami = base_ami(&clients).await;
    let (subnet, sg) = default_network(&clients).await;
    Aws { clients, ami, subnet, sg }
}

impl Aws {
    fn image_spec(&self) -> Value {
        json!({"provider": "aws", "base_ami": self.ami, "instance_type": "t2.micro",
               "build_script": "#!/bin/sh\necho baked > /etc/motd", "builder_shutdown": false})
    }

    fn cluster_spec(&self, image: &str, count: u32) -> Value {
        json!({"provider": "aws", "image": image, "count": count, "instance_type": "t2.micro",
               "subnets": [self.subnet], "security_groups": [self.sg], "key_name": "ops",
               "role_metadata": "role=worker,instancetype=r3", "tags": {"team": "acceptance"}})
    }

    /// `None` when the stack does not exist.
    async fn stack(&self, name: &str) -> Option<drover_ops::aws::testing::cloudformation::types::Stack> {
        let cfn = self.clients.cloudformation().await;
        match cfn.describe_stacks().stack_name(name).send().await {
            Ok(out) => out
                .stacks()
                .first()
                .cloned()
                .filter(|s| s.stack_status().map(|s| s.as_str()) != Some("DELETE_COMPLETE")),
            Err(e) => {
                let text = format!("{e:?}");
                assert!(text.contains("does not exist"), "{text}");
                None
            }
        }
    }

    async fn running_instances(&self, resource_id: &str) -> Vec<ec2::types::Instance> {
        let out = self
            .clients
            .ec2()
            .await
            .describe_instances()
            .filters(ec2::types::Filter::builder().name("tag:drover:resource").values(resource_id).build())
            .filters(ec2::types::Filter::builder().name("instance-state-name").values("running").build())
            .send()
            .await
            .unwrap();
        out.reservations().iter().flat_map(|r| r.instances().iter().cloned()).collect()
    }

    async fn images_of(&self, resource_id: &str) -> Vec<ec2::types::Image> {
        self.clients
            .ec2()
            .await
            .describe_images()
            .owners("self")
            .filters(ec2::types::Filter::builder().name("tag:drover:resource").values(resource_id).build())
            .send()
            .await
            .unwrap()
            .images()
            .to_vec()
    }
}

/// The stack's parameters. moto shows a list parameter (`List<…>`) as a
/// Python list (`['a', 'b']`); AWS shows it as sent (`a,b`): normalised to
/// AWS's.
fn params(stack: &drover_ops::aws::testing::cloudformation::types::Stack) -> Value {
    let aws_form = |v: &str| -> String {
        match v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            Some(list) => list.split(',').map(|i| i.trim().trim_matches('\'')).collect::<Vec<_>>().join(","),
            None => v.to_string(),
        }
    };
    stack
        .parameters()
        .iter()
        .map(|p| {
            (p.parameter_key().unwrap().to_string(), Value::from(aws_form(p.parameter_value().unwrap_or_default())))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn tag<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>, key: &str) -> Option<String> {
    tags.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
}

async fn create(app: &TestApp, kind: &str, name: &str, spec: Value) -> Value {
    let r = app.post(&format!("/v1/{kind}s"), json!({"name": name, "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    r.body
}

async fn built_image(app: &TestApp, aws: &Aws) -> (String, Value) {
    let name = unique("img");
    create(app, "image", &name, aws.image_spec()).await;
    let run = app.run("image", &name, json!({"action": "build"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    (name.clone(), app.get(&format!("/v1/images/{name}")).await.body)
}

/// Image bake, cluster create with a template preview, add-instances,
/// observed instances, destroy — each cross-checked in moto.
#[tokio::test]
async fn aws_image_and_cluster_through_the_api() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;

    let (image_name, image) = built_image(&app, &aws).await;
    assert_eq!(image["state"], "built");
    let ami = image["outputs"]["ami_id"].as_str().expect("ami id").to_string();
    let image_id = image["id"].as_str().unwrap().to_string();
    let found = aws.images_of(&image_id).await;
    assert_eq!(found.len(), 1, "one AMI, tagged with the resource");
    assert_eq!(found[0].image_id(), Some(ami.as_str()));
    assert_eq!(found[0].state().unwrap().as_str(), "available");
    let tags = found[0].tags().iter().map(|t| (t.key().unwrap(), t.value().unwrap()));
    assert!(tag(tags, "drover:run").is_some());

    let name = unique("web");
    let cluster = create(&app, "cluster", &name, aws.cluster_spec(&image_name, 2)).await;
    let id = cluster["id"].as_str().unwrap().to_string();
    assert_eq!(cluster["spec"]["role_metadata"], "role=worker,instancetype=r3");

    // The preview is exactly what is then sent.
    let preview = app.get(&format!("/v1/clusters/{name}/template")).await;
    assert_eq!(preview.status, StatusCode::OK, "{}", preview.body);
    assert_eq!(preview.body["operation"], "CreateStack");
    assert_eq!(preview.body["parameters"]["Count"], "2");
    assert_eq!(preview.body["parameters"]["ImageId"], ami);
    assert_eq!(preview.body["tags"]["drover:resource"], id);
    let stack_name = preview.body["stack_name"].as_str().unwrap().to_string();
    assert!(aws.stack(&stack_name).await.is_none(), "a preview sends nothing");

    let run = app.run("cluster", &name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let stack = aws.stack(&stack_name).await.expect("the stack exists");
    assert_eq!(params(&stack), preview.body["parameters"]);
    let stack_tags = stack.tags().iter().map(|t| (t.key().unwrap(), t.value().unwrap()));
    assert_eq!(tag(stack_tags, "drover:resource"), Some(id.clone()));
    let running = aws.running_instances(&id).await;
    assert_eq!(running.len(), 2, "the auto-scaling group has count instances");
    let itags = running[0].tags().iter().map(|t| (t.key().unwrap(), t.value().unwrap()));
    assert_eq!(tag(itags, "team"), Some("acceptance".into()));
    assert_eq!(running[0].image_id(), Some(ami.as_str()));
    // The group checks its instances, with the cluster's start timeout as
    // grace, and the run waited for them to be InService and Healthy.
    let group = aws.clients.autoscaling().await.describe_auto_scaling_groups().send().await.unwrap();
    let group = group
        .auto_scaling_groups()
        .iter()
        .find(|g| g.tags().iter().any(|t| t.key() == Some("drover:resource") && t.value() == Some(id.as_str())))
        .expect("the cluster's group");
    assert_eq!((group.health_check_type(), group.health_check_grace_period()), (Some("EC2"), Some(30)));
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    let waited = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["message"].as_str().unwrap().ends_with("2 of 2 instance(s) InService and Healthy"));
    assert!(waited, "{events}");

    // The 3 a.m. view lists the instances EC2 shows.
    let seen = app
        .get_until(&format!("/v1/clusters/{name}"), |v| {
            v["observed"]["instances"].as_array().is_some_and(|i| i.len() == 2)
        })
        .await;
    let instances = seen["observed"]["instances"].as_array().expect("observed instances");
    assert_eq!(instances.len(), 2, "{seen}");
    for i in instances {
        assert!(i["id"].as_str().unwrap().starts_with("i-"));
        assert!(i["private_ip"].as_str().is_some());
        assert_eq!(i["state"], "running");
    }
    assert_eq!(seen["observed"]["healthy"], true);
    assert!(seen["allowed_actions"].as_array().unwrap().contains(&json!("add-instances")));

    let run = app.run("cluster", &name, json!({"action": "add-instances", "params": {"n": 1}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(app.get(&format!("/v1/clusters/{name}")).await.body["spec"]["count"], 3);
    let stack = aws.stack(&stack_name).await.unwrap();
    assert_eq!(params(&stack)["Count"], "3");
    assert_eq!(aws.running_instances(&id).await.len(), 3);

    let run = app.run("cluster", &name, json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(aws.stack(&stack_name).await.is_none(), "destroy deletes the stack");
    assert!(aws.running_instances(&id).await.is_empty());

    let run = app.run("image", &image_name, json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(aws.images_of(&image_id).await.is_empty(), "the AMI is deregistered");
}

/// A worker group refuses to be created before its leader is up, then joins
/// it and gets its endpoints.
#[tokio::test]
async fn a_worker_group_joins_its_leader() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image, _) = built_image(&app, &aws).await;
    let leader = unique("core");
    let mut spec = aws.cluster_spec(&image, 2);
    spec["role_metadata"] = "role=core".into();
    create(&app, "cluster", &leader, spec).await;
    let worker = unique("workers");
    let mut spec = aws.cluster_spec(&image, 1);
    spec["join"] = leader.clone().into();
    create(&app, "cluster", &worker, spec).await;

    let r = app.post(&format!("/v1/clusters/{worker}/transitions"), json!({"action": "create"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("is pending"), "{}", r.body);

    let run = app.run("cluster", &leader, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let run = app.run("cluster", &worker, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let leader_id = app.get(&format!("/v1/clusters/{leader}")).await.body["id"].as_str().unwrap().to_string();
    let mut leader_ips: Vec<String> = aws
        .running_instances(&leader_id)
        .await
        .iter()
        .filter_map(|i| i.private_ip_address().map(str::to_string))
        .collect();
    leader_ips.sort();
    assert_eq!(leader_ips.len(), 2);
    let stack_name = run["outputs"]["stack_name"].as_str().unwrap();
    let stack = aws.stack(stack_name).await.expect("worker stack");
    let p = params(&stack);
    assert_eq!(p["LeaderEndpoints"], leader_ips.join(","));
    assert_eq!(p["LeaderName"], leader.as_str());
    assert_eq!(p["RoleMetadata"], "role=worker,instancetype=r3");
}

/// moto refuses a bad instance type in CreateStack itself (AWS would roll
/// the stack back; the scripted provider tests cover that path). The run
/// ends failed with AWS's reason; fixing the spec and `retry` recovers.
#[tokio::test]
async fn a_failing_stack_says_why_and_retry_recovers() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image, _) = built_image(&app, &aws).await;
    let name = unique("bad");
    let mut spec = aws.cluster_spec(&image, 1);
    spec["instance_type"] = "zz.bogus".into();
    let created = create(&app, "cluster", &name, spec).await;
    let run = app.run("cluster", &name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(message.contains("zz.bogus"), "{message}");
    assert_eq!(run["error"]["retryable"], false);
    let view = app.get(&format!("/v1/clusters/{name}")).await.body;
    assert_eq!(view["state"], "failed");
    assert!(view["problem"]["summary"].as_str().unwrap().contains("zz.bogus"), "{view}");

    let r = app.patch(&format!("/v1/clusters/{name}"), json!({"spec": {"instance_type": "t2.micro"}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let retry = app.run("cluster", &name, json!({"action": "retry"})).await;
    assert_eq!(retry["status"], "succeeded", "{retry}");
    assert_eq!(retry["parent"], run["id"]);
    let id = created["id"].as_str().unwrap();
    assert_eq!(aws.running_instances(id).await.len(), 1);
    let stack = aws.stack(retry["outputs"]["stack_name"].as_str().unwrap()).await;
    assert!(stack.is_some());
}

/// A `local` cluster has no template to preview; bad previews name the field.
#[tokio::test]
async fn template_preview_needs_an_aws_cluster() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let local_image = json!({"build_command": "true", "start_command": "sleep 60"});
    create(&app, "image", "web", local_image).await;
    let r = app.post("/v1/clusters", json!({"name": "plain", "spec": {"image": "web", "count": 1}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app.get("/v1/clusters/plain/template").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("local"), "{}", r.body);
    let r = app.get("/v1/clusters/plain/template?action=explode").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let r = app.get("/v1/clusters/nope/template").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    // aws fields on a local cluster are refused by name.
    let spec = json!({"image": "web", "count": 1, "subnets": ["subnet-0abc1234"]});
    let r = app.post("/v1/clusters", json!({"name": "mixed", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.to_string().contains("spec.subnets"), "{}", r.body);
}

/// Termination protection is honoured by destroy with a clear error.
#[tokio::test]
async fn destroy_refuses_a_protected_cluster() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image, _) = built_image(&app, &aws).await;
    let name = unique("prot");
    let mut spec = aws.cluster_spec(&image, 1);
    spec["termination_protection"] = true.into();
    create(&app, "cluster", &name, spec).await;
    let run = app.run("cluster", &name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let stack_name = run["outputs"]["stack_name"].as_str().unwrap().to_string();
    assert_eq!(aws.stack(&stack_name).await.unwrap().enable_termination_protection(), Some(true));
    let run = app.run("cluster", &name, json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "termination_protected");
    assert!(aws.stack(&stack_name).await.is_some(), "the stack is still there");
    // Clean up behind drover's back: moto does not implement
    // UpdateTerminationProtection, which drover would call next.
    let cfn = aws.clients.cloudformation().await;
    cfn.delete_stack().stack_name(&stack_name).send().await.unwrap();
}

/// Does the real work, then never returns: a worker that died after AWS
/// accepted its request, before drover recorded anything.
struct DiesAfterWork {
    inner: Arc<dyn Provider>,
    done: Arc<Notify>,
}

#[async_trait]
impl Provider for DiesAfterWork {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let _ = self.inner.apply(ctx, job).await;
        self.done.notify_one();
        std::future::pending().await
    }
}

/// A run whose lease lapsed mid-create (or mid-bake) is reclaimed by the
/// reaper and finished by another worker, which adopts the stack (image)
/// the lost attempt made: there is exactly one of each.
#[tokio::test]
async fn a_lapsed_lease_mid_create_makes_no_second_stack_or_image() {
    let app = spawn_app_on_moto_without_workers(Backend::Postgres).await;
    let aws = aws().await;
    let store = drover_persistence::connect(app.database_url()).await.unwrap();
    let mut real = Providers::default();
    drover_ops::aws::register(&mut real, moto_settings());
    let done = Arc::new(Notify::new());
    let mut dying = Providers::default();
    for kind in [drover_domain::kinds::image::KIND, drover_domain::kinds::cluster::KIND] {
        dying.register(
            "aws",
            kind,
            Arc::new(DiesAfterWork { inner: real.get("aws", kind).unwrap().clone(), done: done.clone() }),
        );
    }
    let short = EngineConfig {
        worker_id: "doomed".into(),
        lease: Duration::from_secs(1),
        heartbeat: Duration::from_secs(3600),
        ..EngineConfig::default()
    };
    let doomed = Engine::new(store.clone(), dying, short);
    let healthy =
        Engine::new(store.clone(), real, EngineConfig { worker_id: "healthy".into(), ..EngineConfig::default() });

    // Runs the queued transition on the doomed worker until its work is
    // done, kills it, lets the lease lapse, and finishes on the healthy one.
    let lapse_and_finish = |run: String| {
        let (doomed, healthy, done, app) = (doomed.clone(), healthy.clone(), done.clone(), &app);
        async move {
            let task = tokio::spawn(async move { doomed.run_one().await });
            done.notified().await;
            task.abort();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let reaped = healthy.reap().await.unwrap();
            assert_eq!(reaped.len(), 1);
            assert!(healthy.run_one().await.unwrap().is_some());
            let t = app.get(&format!("/v1/transitions/{run}")).await.body;
            assert_eq!(t["status"], "succeeded", "{t}");
            assert_eq!(t["attempt"], 2, "{t}");
            let events = app.get(&format!("/v1/transitions/{run}/events")).await.body;
            let adopted = events["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["attempt"] == 2 && e["message"].as_str().unwrap().contains("adopting"));
            assert!(adopted, "{events}");
            t
        }
    };

    let image = unique("img");
    let created = create(&app, "image", &image, aws.image_spec()).await;
    let run = app.transition("image", &image, json!({"action": "build"})).await;
    let t = lapse_and_finish(run).await;
    let image_id = created["id"].as_str().unwrap();
    let images = aws.images_of(image_id).await;
    assert_eq!(images.len(), 1, "one AMI");
    assert_eq!(images[0].image_id(), t["outputs"]["ami_id"].as_str());

    let name = unique("web");
    let created = create(&app, "cluster", &name, aws.cluster_spec(&image, 2)).await;
    let run = app.transition("cluster", &name, json!({"action": "create"})).await;
    let t = lapse_and_finish(run).await;
    let stack = aws.stack(t["outputs"]["stack_name"].as_str().unwrap()).await.expect("stack");
    assert_eq!(stack.stack_id(), t["outputs"]["stack_id"].as_str());
    let id = created["id"].as_str().unwrap();
    assert_eq!(aws.running_instances(id).await.len(), 2, "one stack's worth of instances");
}

/// A bake cancelled while it waits for its builder (which never powers
/// off in moto) ends cancelled and leaves no builder running: the engine
/// has the provider clean up after an attempt that ended for good.
#[tokio::test]
async fn a_cancelled_bake_leaves_no_builder_running() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let name = unique("img");
    let mut spec = aws.image_spec();
    spec["builder_shutdown"] = json!(true);
    let image = create(&app, "image", &name, spec).await;
    let id = image["id"].as_str().unwrap().to_string();
    let run = app.transition("image", &name, json!({"action": "build"})).await;
    let mut launched = false;
    for _ in 0..300 {
        if !aws.running_instances(&id).await.is_empty() {
            launched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(launched, "the bake launched its builder");
    let r = app.post(&format!("/v1/transitions/{run}/cancel"), json!({"reason": "changed my mind"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let ended = app.wait(&run).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert!(aws.running_instances(&id).await.is_empty(), "a builder is left running");
    let events = app.get(&format!("/v1/transitions/{run}/events")).await.body;
    assert!(events.to_string().contains("terminated builder"), "{events}");
}

/// The SSM commands moto holds whose comment names `run`.
async fn commands_of(aws: &Aws, run: &str) -> Vec<drover_ops::aws::testing::ssm::types::Command> {
    let out = aws.clients.ssm().await.list_commands().send().await.unwrap();
    let comment = format!("drover run {run}");
    out.commands().iter().filter(|c| c.comment() == Some(comment.as_str())).cloned().collect()
}

/// A job on an aws cluster goes to its running instances through SSM Run
/// Command: the command, its bounds and the non-secret settings as sent,
/// every instance's result read back, `once` to one instance, and the same
/// run tried again adopts the command instead of sending it twice.
#[tokio::test]
async fn aws_jobs_run_through_ssm_run_command() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image_name, _) = built_image(&app, &aws).await;
    let name = unique("ops");
    let cluster = create(&app, "cluster", &name, aws.cluster_spec(&image_name, 2)).await;
    let cluster_id = cluster["id"].as_str().unwrap().to_string();
    assert_eq!(app.run("cluster", &name, json!({"action": "create"})).await["status"], "succeeded");
    let instances: Vec<String> =
        aws.running_instances(&cluster_id).await.iter().map(|i| i.instance_id().unwrap().to_string()).collect();
    assert_eq!(instances.len(), 2);
    for (key, body) in
        [("LOG_LEVEL", json!({"value": "debug"})), ("DB_PASSWORD", json!({"value": "hunter2-aws", "secret": true}))]
    {
        let r = app.send(&app.client, "PUT", &format!("/v1/settings/cluster:{name}/{key}"), Some(body)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    // Bad specs are named: an image cannot travel to an AMI's machines, the
    // provider must be the cluster's, constraints must match at request time.
    let job_name = unique("vacuum");
    let bad = app
        .post("/v1/jobs", json!({"name": job_name, "spec": {"provider": "aws", "cluster": name, "command": "x", "image": image_name}}))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(bad.body["errors"][0]["field"], "spec.image");
    let bad = app.post("/v1/jobs", json!({"name": job_name, "spec": {"cluster": name, "command": "x"}})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert!(
        bad.body["errors"][0]["message"].as_str().unwrap().contains("set spec.provider to \"aws\""),
        "{}",
        bad.body
    );

    let spec = json!({"provider": "aws", "cluster": name, "command": "df -h / && echo it's fine",
        "max_concurrency": 1, "max_errors": 1, "timeout_secs": 120, "env": {"REASON": "maintenance"}});
    create(&app, "job", &job_name, spec).await;
    let run = app.run("job", &job_name, json!({"action": "run", "reason": "weekly"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let mut by: Vec<(String, String)> = run["outputs"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["instance_id"].as_str().unwrap().to_string(), r["status"].as_str().unwrap().to_string()))
        .collect();
    by.sort();
    let mut want: Vec<(String, String)> = instances.iter().map(|i| (i.clone(), "succeeded".to_string())).collect();
    want.sort();
    assert_eq!(by, want, "{run}");
    assert_eq!(run["outputs"]["results"][0]["exit_code"], 0);

    // What SSM was sent: one command, to the cluster's instances, with the
    // job's bounds, its command and environment, and no secret.
    let run_id = run["id"].as_str().unwrap();
    let sent = commands_of(&aws, run_id).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let c = &sent[0];
    assert_eq!(c.document_name(), Some("AWS-RunShellScript"));
    // moto adds every instance it has to a command sent without targets
    // (AWS keeps the ids it was given): what drover asked for is in its event.
    assert!(instances.iter().all(|i| c.instance_ids().contains(i)), "{c:?}");
    let events = app.get(&format!("/v1/transitions/{run_id}/events")).await.body;
    let asked = events["events"].as_array().unwrap().iter().find(|e| e["step"] == "command").expect("sent");
    let mut to: Vec<String> = serde_json::from_value(asked["data"]["instances"].clone()).unwrap();
    to.sort();
    let mut all = instances.clone();
    all.sort();
    assert_eq!(to, all);
    assert_eq!((c.max_concurrency(), c.max_errors()), (Some("1"), Some("1")));
    let params = c.parameters().expect("parameters");
    assert_eq!(params["executionTimeout"], ["120"]);
    let script = params["commands"].join("\n");
    assert!(script.contains("sh -c 'df -h / && echo it'\\''s fine'"), "{script}");
    assert!(script.contains("export LOG_LEVEL='debug'"), "{script}");
    assert!(script.contains("export REASON='maintenance'"), "{script}");
    assert!(script.contains(&format!("export DROVER_RUN_ID='{run_id}'")), "{script}");
    assert!(
        !script.contains("hunter2-aws") && !script.contains("DB_PASSWORD"),
        "a secret never goes into SSM: {script}"
    );
    let said = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["step"] == "settings" && e["message"].as_str().unwrap().contains("DB_PASSWORD"));
    assert!(said, "the run says which secret settings were left out: {events}");

    // `once`: one instance.
    let r = app.patch(&format!("/v1/jobs/{job_name}"), json!({"spec": {"target": "once"}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let run = app.run("job", &job_name, json!({"action": "run"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["outputs"]["targets"], 1);
    assert_eq!(run["outputs"]["results"].as_array().unwrap().len(), 1);

    // Constraints no instance carries: refused when the run is asked for.
    let r = app.patch(&format!("/v1/jobs/{job_name}"), json!({"spec": {"constraints": "role=db"}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.post(&format!("/v1/jobs/{job_name}/transitions"), json!({"action": "run"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "spec.constraints");

    // The same run tried again (drover died after sending) adopts the
    // command its first attempt sent.
    let jobs = drover_ops::aws::AwsJobs::new(
        aws.clients.clone(),
        Arc::new(drover_ops::aws::SdkStacks::new(aws.clients.clone())),
        moto_settings().poll,
    );
    let spec = json!({"provider": "aws", "cluster": name, "command": "uptime"});
    let cluster_r = app.get(&format!("/v1/clusters/{name}")).await.body;
    let mut c = drover_ops::aws::testing::resource(
        drover_domain::kinds::cluster::KIND,
        &name,
        cluster_r["spec"].clone(),
        "up",
        json!({}),
    );
    c.id = cluster_id.parse().unwrap();
    let job = drover_ops::aws::testing::job(drover_domain::kinds::job::KIND, "again", spec, "run", json!({}), vec![c]);
    let ctx = drover_ops::aws::testing::RecordingCtx::new(job.run_id);
    let first = jobs.apply(&ctx, &job).await.expect("first attempt");
    let second = jobs.apply(&ctx, &job).await.expect("second attempt");
    assert_eq!(first["succeeded"], 2);
    assert_eq!(second["succeeded"], 2);
    assert_eq!(commands_of(&aws, &job.run_id.to_string()).await.len(), 1, "sent once");
    assert!(ctx.messages().iter().any(|m| m.starts_with("command: adopting command")), "{:?}", ctx.messages());

    assert_eq!(app.run("job", &job_name, json!({"action": "destroy"})).await["status"], "succeeded");
    assert_eq!(app.run("cluster", &name, json!({"action": "destroy"})).await["status"], "succeeded");
}

/// The parameters under `path` in moto's Parameter Store: name → (type, value).
async fn parameters_under(aws: &Aws, path: &str) -> std::collections::BTreeMap<String, (String, String)> {
    let out = aws.clients.ssm().await.get_parameters_by_path().path(path).with_decryption(true).send().await.unwrap();
    out.parameters()
        .iter()
        .map(|p| {
            let kind = p.r#type().map(|t| t.as_str().to_string()).unwrap_or_default();
            (p.name().unwrap().to_string(), (kind, p.value().unwrap_or_default().to_string()))
        })
        .collect()
}

/// An aws cluster's instances get their settings: the non-secret ones in
/// the cloud-config (a file only root reads), the secret ones in SSM
/// Parameter Store as SecureString, never in the template or user-data; a
/// changed setting is a pending change of the cluster until a run applies
/// it; destroy takes the parameters away.
#[tokio::test]
async fn aws_clusters_deliver_settings_and_keep_secrets_out_of_user_data() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image_name, _) = built_image(&app, &aws).await;
    let name = unique("set");
    let cluster = create(&app, "cluster", &name, aws.cluster_spec(&image_name, 1)).await;
    let id = cluster["id"].as_str().unwrap().to_string();
    let put = |key: &'static str, body: Value| {
        let (app, name) = (&app, name.clone());
        async move {
            let r = app.send(&app.client, "PUT", &format!("/v1/settings/cluster:{name}/{key}"), Some(body)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
    };
    put("LOG_LEVEL", json!({"value": "debug"})).await;
    put("DB_PASSWORD", json!({"value": "hunter2-in-ssm", "secret": true})).await;
    put("API_KEY", json!({"value": "k-0123456789", "secret": true})).await;

    // The preview is what will be sent: the non-secret value, the secret
    // ones named only.
    let preview = app.get(&format!("/v1/clusters/{name}/template")).await.body;
    let path = format!("/drover/clusters/{id}/");
    assert_eq!(preview["parameters"]["SecretsPath"], path.as_str());
    let body = preview["template"].to_string();
    assert!(body.contains(r#"LOG_LEVEL=\"debug\""#), "{body}");
    assert!(body.contains("drover-secrets.service"), "{body}");
    assert!(!body.contains("hunter2-in-ssm") && !body.contains("k-0123456789"), "no secret in the template");

    let run = app.run("cluster", &name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let sent = aws
        .clients
        .cloudformation()
        .await
        .get_template()
        .stack_name(preview["stack_name"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let sent = sent.template_body().unwrap_or_default().to_string();
    assert!(sent.contains("/etc/drover/settings.env") && sent.contains("LOG_LEVEL"), "{sent}");
    assert!(!sent.contains("hunter2-in-ssm") && !sent.contains("k-0123456789"), "no secret in the stack: {sent}");
    let stored = parameters_under(&aws, &path).await;
    assert_eq!(
        stored,
        [
            (format!("{path}API_KEY"), ("SecureString".to_string(), "k-0123456789".to_string())),
            (format!("{path}DB_PASSWORD"), ("SecureString".to_string(), "hunter2-in-ssm".to_string())),
        ]
        .into_iter()
        .collect()
    );
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    assert!(!events.to_string().contains("hunter2-in-ssm"), "no secret in the run's events");
    assert_eq!(app.get(&format!("/v1/clusters/{name}")).await.body["pending_changes"], json!([]));

    // Changed settings wait for a run, and the view says which.
    put("LOG_LEVEL", json!({"value": "info"})).await;
    let r = app.send(&app.client, "DELETE", &format!("/v1/settings/cluster:{name}/API_KEY"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let view = app.get(&format!("/v1/clusters/{name}")).await.body;
    let pending: Vec<(String, Value, Value)> = view["pending_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["field"].as_str().unwrap().to_string(), p["applied"]["version"].clone(), p["wanted"]["version"].clone())
        })
        .collect();
    assert_eq!(
        pending,
        [
            ("settings.API_KEY".to_string(), json!(1), Value::Null),
            ("settings.LOG_LEVEL".to_string(), json!(1), json!(2)),
        ],
        "{view}"
    );
    assert!(view["pending_changes"][0]["applied_by"].as_array().unwrap().contains(&json!("scale")), "{view}");
    assert!(!view.to_string().contains("hunter2-in-ssm"));

    // A scale applies them: the deleted secret leaves Parameter Store.
    let run = app.run("cluster", &name, json!({"action": "scale", "params": {"count": 2}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let stored: Vec<String> = parameters_under(&aws, &path).await.into_keys().collect();
    assert_eq!(stored, [format!("{path}DB_PASSWORD")]);
    assert_eq!(app.get(&format!("/v1/clusters/{name}")).await.body["pending_changes"], json!([]));

    assert_eq!(app.run("cluster", &name, json!({"action": "destroy"})).await["status"], "succeeded");
    assert!(parameters_under(&aws, &path).await.is_empty(), "destroy takes the secrets away");
}

/// Whether an ELB resource carries drover's tag for `resource_id`.
async fn tagged_with(aws: &Aws, arn: &str, resource_id: &str) -> bool {
    let tags = aws.clients.elb().await.describe_tags().resource_arns(arn).send().await.unwrap();
    tags.tag_descriptions()
        .iter()
        .flat_map(|d| d.tags())
        .any(|t| t.key() == Some("drover:resource") && t.value() == Some(resource_id))
}

/// The router's load balancer, found by its drover tag.
async fn alb_of(aws: &Aws, router_id: &str) -> Option<elbv2::types::LoadBalancer> {
    let c = aws.clients.elb().await;
    let all = c.describe_load_balancers().send().await.unwrap();
    for lb in all.load_balancers() {
        if tagged_with(aws, lb.load_balancer_arn().unwrap(), router_id).await {
            return Some(lb.clone());
        }
    }
    None
}

/// The router's target groups with their servers (`ip:port`, sorted), by arn.
async fn groups_of(aws: &Aws, router_id: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let c = aws.clients.elb().await;
    let mut out = std::collections::BTreeMap::new();
    for g in c.describe_target_groups().send().await.unwrap().target_groups() {
        let arn = g.target_group_arn().unwrap();
        if !tagged_with(aws, arn, router_id).await {
            continue;
        }
        let health = c.describe_target_health().target_group_arn(arn).send().await.unwrap();
        let mut servers: Vec<String> = health
            .target_health_descriptions()
            .iter()
            .filter_map(|t| t.target())
            .map(|t| format!("{}:{}", t.id().unwrap(), t.port().unwrap()))
            .collect();
        servers.sort();
        out.insert(arn.to_string(), servers);
    }
    out
}

/// `(priority, conditions, forwards)` of a listener's rules, the default's
/// priority being `default`.
async fn rules_of(aws: &Aws, listener: &str) -> Vec<(String, Vec<String>, Vec<(String, i32)>)> {
    let c = aws.clients.elb().await;
    let out = c.describe_rules().listener_arn(listener).send().await.unwrap();
    let mut rules: Vec<_> = out
        .rules()
        .iter()
        .map(|r| {
            let conditions = r
                .conditions()
                .iter()
                .map(|c| {
                    let mut v: Vec<String> = c.values().to_vec();
                    v.extend(c.host_header_config().map(|h| h.values().to_vec()).unwrap_or_default());
                    v.extend(c.path_pattern_config().map(|p| p.values().to_vec()).unwrap_or_default());
                    v.dedup();
                    format!("{} {}", c.field().unwrap(), v.join(" "))
                })
                .collect();
            let forwards = r
                .actions()
                .iter()
                .flat_map(|a| a.forward_config().map(|f| f.target_groups().to_vec()).unwrap_or_default())
                .map(|t| (t.target_group_arn().unwrap().to_string(), t.weight().unwrap_or(1)))
                .collect();
            (r.priority().unwrap().to_string(), conditions, forwards)
        })
        .collect();
    rules.sort();
    rules
}

/// The private `ip:port` of a cluster's running instances.
async fn servers_of(aws: &Aws, cluster_id: &str, port: u16) -> Vec<String> {
    let mut ips: Vec<String> = aws
        .running_instances(cluster_id)
        .await
        .iter()
        .map(|i| format!("{}:{port}", i.private_ip_address().unwrap()))
        .collect();
    ips.sort();
    ips
}

/// Routers on aws through the API: an Application Load Balancer with a
/// listener per frontend, a rule per host and path rule, a target group
/// per backend fed from a cluster's instances (and following its scale),
/// an apply that changes only the rules that differ, a blue/green swap
/// and its swap-back, stop and start, destroy — cross-checked in moto.
#[tokio::test]
async fn aws_routers_are_application_load_balancers() {
    let mut app = spawn_app_on_moto(Backend::Sqlite).await;
    app.set_observe_every(Duration::from_millis(300)).await;
    let aws = aws().await;
    let (image, _) = built_image(&app, &aws).await;
    let mut ids = std::collections::BTreeMap::new();
    for (name, count) in [("blue", 2), ("green", 1)] {
        let cluster = unique(name);
        let created = create(&app, "cluster", &cluster, aws.cluster_spec(&image, count)).await;
        let run = app.run("cluster", &cluster, json!({"action": "create"})).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        ids.insert(name, (cluster, created["id"].as_str().unwrap().to_string()));
    }
    let (blue, blue_id) = ids["blue"].clone();
    let (green, green_id) = ids["green"].clone();
    let env = unique("env");
    create(&app, "environment", &env, json!({})).await;
    // Two subnets of moto's default VPC, in two zones.
    let subnets = aws.clients.ec2().await.describe_subnets().send().await.unwrap();
    let mut zones = std::collections::BTreeMap::new();
    for s in subnets.subnets() {
        if s.default_for_az() == Some(true) {
            zones.entry(s.availability_zone().unwrap().to_string()).or_insert(s.subnet_id().unwrap().to_string());
        }
    }
    let two: Vec<String> = zones.into_values().take(2).collect();
    assert_eq!(two.len(), 2, "moto's default VPC has subnets in two zones");

    // Bad specs are refused naming the field, before anything is made.
    let bad = json!({"environment": env, "provider": "aws", "subnets": [two[0]],
        "frontends": [{"name": "pg", "mode": "tcp", "port": 5432, "backend": "db"}],
        "backends": [{"name": "db", "target": {"cluster": blue}}]});
    let r = app.post("/v1/routers", json!({"name": unique("bad"), "spec": bad})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let text = r.body.to_string();
    assert!(text.contains("spec.subnets") && text.contains("spec.frontends[0].mode"), "{text}");

    let name = unique("edge");
    let spec = json!({"environment": env, "provider": "aws", "subnets": two, "security_groups": [aws.sg],
        "frontends": [{"name": "web", "mode": "http", "port": 80, "backend": "site",
            "rules": [{"host": "api.example.com", "backend": "api"}, {"path_prefix": "/api", "backend": "api"}]}],
        "backends": [{"name": "site", "target": {"cluster": blue}, "port": 8080},
            {"name": "api", "target": {"cluster": green}, "port": 9090, "check": {"type": "http", "path": "/health"}}]});
    let router = create(&app, "router", &name, spec).await;
    let id = router["id"].as_str().unwrap().to_string();
    let run = app.run("router", &name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // The load balancer, its listener and rules, its target groups.
    let lb = alb_of(&aws, &id).await.expect("the router's load balancer");
    assert_eq!(lb.scheme().unwrap().as_str(), "internal");
    assert_eq!(lb.security_groups(), std::slice::from_ref(&aws.sg));
    let dns = lb.dns_name().unwrap().to_string();
    let view = app.get(&format!("/v1/routers/{name}")).await.body;
    assert_eq!(view["outputs"]["frontends"][0]["url"], format!("http://{dns}:80"), "{view}");
    let elb = aws.clients.elb().await;
    let listeners = elb.describe_listeners().load_balancer_arn(lb.load_balancer_arn().unwrap()).send().await.unwrap();
    assert_eq!(listeners.listeners().len(), 1);
    let listener = listeners.listeners()[0].clone();
    assert_eq!(listener.port(), Some(80));
    let listener_arn = listener.listener_arn().unwrap().to_string();
    let groups = groups_of(&aws, &id).await;
    assert_eq!(groups.len(), 2, "a group per backend: {groups:?}");
    let group_with = |groups: &std::collections::BTreeMap<String, Vec<String>>, servers: &[String]| {
        groups.iter().find(|(_, s)| s.as_slice() == servers).map(|(arn, _)| arn.clone())
    };
    let blue_servers = servers_of(&aws, &blue_id, 8080).await;
    assert_eq!(blue_servers.len(), 2);
    let site = group_with(&groups, &blue_servers).unwrap_or_else(|| panic!("blue's servers in a group: {groups:?}"));
    let api = group_with(&groups, &servers_of(&aws, &green_id, 9090).await).expect("green's servers on 9090");
    let api_group = elb.describe_target_groups().target_group_arns(&api).send().await.unwrap();
    assert_eq!(api_group.target_groups()[0].health_check_path(), Some("/health"));
    assert_eq!(api_group.target_groups()[0].target_type().unwrap().as_str(), "ip");
    let rules = rules_of(&aws, &listener_arn).await;
    assert_eq!(
        rules,
        [
            ("1".into(), vec!["host-header api.example.com".into()], vec![(api.clone(), 1)]),
            ("2".into(), vec!["path-pattern /api /api/*".into()], vec![(api.clone(), 1)]),
            ("default".into(), vec![], vec![(site.clone(), 1)]),
        ],
        "first match wins, in the spec's order"
    );

    // The view: moto's health checks, and the configuration as a version.
    let view = app
        .get_until(&format!("/v1/routers/{name}"), |v| {
            v["observed"]["servers"].as_array().is_some_and(|s| s.len() == 3)
        })
        .await;
    assert_eq!(view["observed"]["status"], "serving", "{view}");
    assert_eq!(view["observed"]["healthy"], true, "{view}");
    assert!(view["observed"]["servers"].as_array().unwrap().iter().all(|s| s["status"] == "UP"), "{view}");
    let configs = app.get(&format!("/v1/routers/{name}/configs")).await.body;
    let first = &configs["configs"].as_array().unwrap().last().unwrap();
    assert_eq!(first["outcome"], "applied", "{configs}");
    let text = app.get(&format!("/v1/routers/{name}/configs/{}", first["version"])).await.body;
    let desired: Value = serde_json::from_str(text["config"].as_str().unwrap()).unwrap();
    assert_eq!(desired["load_balancer"]["name"], lb.load_balancer_name().unwrap());

    // A cluster that scales: its new instance is registered by the keeper.
    let run = app.run("cluster", &blue, json!({"action": "add-instances", "params": {"n": 1}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let blue_servers = servers_of(&aws, &blue_id, 8080).await;
    assert_eq!(blue_servers.len(), 3);
    let mut now = Vec::new();
    for _ in 0..100 {
        now = groups_of(&aws, &id).await.get(&site).cloned().unwrap_or_default();
        if now == blue_servers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(now, blue_servers, "the scaled cluster's servers, in the same group");

    // apply: the host rule goes; the path rule takes its priority.
    let frontends = json!([{"name": "web", "mode": "http", "port": 80, "backend": "site",
        "rules": [{"path_prefix": "/api", "backend": "api"}]}]);
    let r = app.patch(&format!("/v1/routers/{name}"), json!({"spec": {"frontends": frontends}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let run = app.run("router", &name, json!({"action": "apply"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let rules = rules_of(&aws, &listener_arn).await;
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(rules[0], ("1".into(), vec!["path-pattern /api /api/*".into()], vec![(api.clone(), 1)]));

    // Blue/green: site moves to green (on 8080), through a group of its own.
    let green_servers = servers_of(&aws, &green_id, 8080).await;
    let swap = app
        .run(
            "router",
            &name,
            json!({"action": "swap", "params": {"backend": "site", "to": {"cluster": green},
            "verify_secs": 1, "health_timeout_secs": 30}}),
        )
        .await;
    assert_eq!(swap["status"], "succeeded", "{swap}");
    let events = app.get(&format!("/v1/transitions/{}/events", swap["id"].as_str().unwrap())).await.body;
    let messages: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.contains("checks pass on all 1 server(s)")), "{messages:#?}");
    assert!(messages.iter().any(|m| m.contains("the guard watches its health checks")), "{messages:#?}");
    assert!(messages.iter().any(|m| m.starts_with("verified for 1s: 0 of 1 servers")), "{messages:#?}");
    let groups = groups_of(&aws, &id).await;
    let site_green = group_with(&groups, &green_servers).expect("green's servers on 8080 in a group");
    assert!(!groups.contains_key(&site), "blue's group is gone once nothing forwards to it: {groups:?}");
    let rules = rules_of(&aws, &listener_arn).await;
    assert_eq!(rules.last().unwrap().2, [(site_green.clone(), 1)], "the default action forwards to green");
    let view = app.get(&format!("/v1/routers/{name}")).await.body;
    assert_eq!(view["spec"]["backends"][0]["target"], json!({"cluster": green}));
    assert_eq!(view["spec"]["backends"][0]["standby"], json!({"cluster": blue}));

    let back =
        app.run("router", &name, json!({"action": "swap-back", "params": {"backend": "site", "verify_secs": 0}})).await;
    assert_eq!(back["status"], "succeeded", "{back}");
    let groups = groups_of(&aws, &id).await;
    let site_blue = group_with(&groups, &blue_servers).expect("blue's servers again");
    assert!(!groups.contains_key(&site_green));
    assert_eq!(rules_of(&aws, &listener_arn).await.last().unwrap().2, [(site_blue, 1)]);

    // stop deletes the listeners and keeps the load balancer; start makes them again.
    let run = app.run("router", &name, json!({"action": "stop"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let arn = lb.load_balancer_arn().unwrap();
    assert!(elb.describe_listeners().load_balancer_arn(arn).send().await.unwrap().listeners().is_empty());
    let run = app.run("router", &name, json!({"action": "start"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let listeners = elb.describe_listeners().load_balancer_arn(arn).send().await.unwrap();
    assert_eq!(listeners.listeners().len(), 1);
    assert_eq!(alb_of(&aws, &id).await.unwrap().dns_name(), Some(dns.as_str()), "the same load balancer");

    // A configuration AWS refuses (a subnet that does not exist) changes
    // nothing: the run fails saying why, the version is kept as invalid.
    let r = app
        .patch(&format!("/v1/routers/{name}"), json!({"spec": {"subnets": [two[0], "subnet-0000dead"]}}), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let run = app.run("router", &name, json!({"action": "apply"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["error"]["message"].as_str().unwrap().contains("SubnetNotFound"), "{run}");
    let configs = app.get(&format!("/v1/routers/{name}/configs")).await.body;
    assert_eq!(configs["configs"][0]["outcome"], "invalid", "{configs}");
    let lb = alb_of(&aws, &id).await.unwrap();
    let mut zones: Vec<&str> = lb.availability_zones().iter().filter_map(|z| z.subnet_id()).collect();
    zones.sort();
    let mut want: Vec<&str> = two.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(zones, want, "the load balancer is as it was");
    assert_eq!(elb.describe_listeners().load_balancer_arn(arn).send().await.unwrap().listeners().len(), 1);

    // destroy removes the load balancer and every group.
    let run = app.run("router", &name, json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(alb_of(&aws, &id).await.is_none());
    assert!(groups_of(&aws, &id).await.is_empty());
}

/// Resizes an auto-scaling group by hand, as someone in the console would
/// (with its bounds: a stack's group has min = max = count).
async fn resize(aws: &Aws, group: &str, (min, max): (i32, i32), desired: i32) {
    aws.clients
        .autoscaling()
        .await
        .update_auto_scaling_group()
        .auto_scaling_group_name(group)
        .min_size(min)
        .max_size(max)
        .desired_capacity(desired)
        .send()
        .await
        .unwrap();
}

/// Drift on aws: a refresh names what was changed behind drover's back —
/// the cluster's auto-scaling group resized through the API (then adopted;
/// then shrunk and repaired), an instance's tag removed, an image's AMI
/// deregistered — and changes nothing. moto has no CloudFormation
/// drift detection: the refresh says so (`stack.drift` unchecked), so a
/// cluster on moto is never `in_sync`, only `unknown` or `drifted`.
#[tokio::test]
async fn aws_refresh_names_what_changed_behind_drovers_back() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image_name, image) = built_image(&app, &aws).await;
    let refresh = |kind: &'static str, name: String| {
        let app = &app;
        async move {
            let run = app.run(kind, &name, json!({"action": "refresh"})).await;
            assert_eq!(run["status"], "succeeded", "{run}");
            let view = app.get(&format!("/v1/{kind}s/{name}")).await.body;
            assert_eq!(view["drift"]["run"], run["id"]);
            view
        }
    };
    assert_eq!(refresh("image", image_name.clone()).await["drift"]["status"], "in_sync");

    let name = unique("drifting");
    create(&app, "cluster", &name, aws.cluster_spec(&image_name, 1)).await;
    assert_eq!(app.run("cluster", &name, json!({"action": "create"})).await["status"], "succeeded");
    let view = refresh("cluster", name.clone()).await;
    assert_eq!(view["drift"]["status"], "unknown", "{view}");
    assert_eq!(view["drift"]["differences"], json!([]));
    let unchecked = view["drift"]["unchecked"].as_array().unwrap();
    assert_eq!(unchecked.len(), 1, "{view}");
    assert_eq!(unchecked[0]["path"], "stack.drift");
    assert!(unchecked[0]["why"].as_str().unwrap().contains("drift detection did not run"), "{view}");

    // The group resized behind drover's back.
    let group = view["outputs"]["stack_outputs"]["AutoScalingGroupName"].as_str().unwrap().to_string();
    resize(&aws, &group, (1, 2), 2).await;
    let view = refresh("cluster", name.clone()).await;
    assert_eq!(view["drift"]["status"], "drifted", "{view}");
    let differences = view["drift"]["differences"].as_array().unwrap();
    let resized = json!({"path": "group.desired_capacity", "recorded": 1, "actual": 2, "adopt": {"count": 2}});
    assert!(differences.contains(&resized), "{view}");
    assert_eq!(view["state"], "up");
    assert_eq!(view["spec"]["count"], 1, "a refresh adopts nothing");

    // Adopted: the record says two, as a new spec version, and the stack's
    // parameters too.
    let run = app.run("cluster", &name, json!({"action": "adopt", "reason": "two it is"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["params"]["spec"], json!({"count": 2}), "{run}");
    let view = refresh("cluster", name.clone()).await;
    assert_eq!((&view["spec"]["count"], &view["outputs"]["count"]), (&json!(2), &json!(2)), "{view}");
    assert_eq!(view["pending_changes"], json!([]), "{view}");
    assert_eq!(view["drift"]["differences"], json!([]), "{view}");
    let stack = view["outputs"]["stack_name"].as_str().unwrap();
    let described = aws.clients.cloudformation().await.describe_stacks().stack_name(stack).send().await.unwrap();
    let count = described.stacks()[0].parameters().iter().find(|p| p.parameter_key() == Some("Count")).cloned();
    assert_eq!(count.and_then(|p| p.parameter_value().map(str::to_string)).as_deref(), Some("2"));

    // Shrunk by hand: a repair puts the recorded capacity back. (moto
    // makes a new group on a stack update: ask the stack for its name.)
    let group = view["outputs"]["stack_outputs"]["AutoScalingGroupName"].as_str().unwrap().to_string();
    resize(&aws, &group, (1, 2), 1).await;
    let view = refresh("cluster", name.clone()).await;
    let differences = view["drift"]["differences"].as_array().unwrap();
    assert!(
        differences.contains(&json!({"path": "group.desired_capacity", "recorded": 2, "actual": 1,
        "adopt": {"count": 1}})),
        "{view}"
    );
    let run = app.run("cluster", &name, json!({"action": "repair", "reason": "put it back"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let view = refresh("cluster", name.clone()).await;
    assert_eq!(view["drift"]["differences"], json!([]), "{view}");
    assert_eq!(view["spec"]["count"], 2);
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    assert!(events.to_string().contains("desired capacity 1 set to 2"), "{events}");

    // A tag taken off an instance by hand is named, and cannot be adopted.
    let instance = view["outputs"]["instances"][0]["id"].as_str().unwrap().to_string();
    drover_ops::aws::testing::untag(&aws.clients, &instance, "team").await;
    let view = refresh("cluster", name.clone()).await;
    assert_eq!(
        view["drift"]["differences"],
        json!([{"path": format!("instances[{instance}].tags.team"), "recorded": "acceptance", "actual": "absent"}]),
        "{view}"
    );
    let r = app.post(&format!("/v1/clusters/{name}/transitions"), json!({"action": "adopt"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "an adopt says why: {}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "reason", "{}", r.body);
    let adopt = json!({"action": "adopt", "reason": "the tag is gone for good"});
    let r = app.post(&format!("/v1/clusters/{name}/transitions"), adopt).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["type"].as_str().unwrap().rsplit('/').next(), Some("nothing-to-adopt"), "{}", r.body);

    // The image's AMI deregistered by someone's clean-up script.
    let ami = image["outputs"]["ami_id"].as_str().unwrap().to_string();
    let build = image["outputs"]["build"].as_str().unwrap().to_string();
    aws.clients.ec2().await.deregister_image().image_id(&ami).send().await.unwrap();
    let view = refresh("image", image_name).await;
    assert_eq!(view["drift"]["status"], "drifted", "{view}");
    assert_eq!(
        view["drift"]["differences"],
        json!([{"path": format!("builds[{build}].ami"), "recorded": ami, "actual": "deregistered"}])
    );
    assert_eq!(view["state"], "built");
}

/// An aws image baked with an artifact bucket: the test plays the builder's
/// part moto cannot (the wrapper's tags: the build ended well, the
/// artifact's checksum) and returns the build's id.
async fn bake_with_artifact(app: &TestApp, aws: &Aws, name: &str, sha256: &str) -> String {
    let image = app.get(&format!("/v1/images/{name}")).await.body;
    let image_id = image["id"].as_str().unwrap().to_string();
    let run = app.transition("image", name, json!({"action": "build"})).await;
    let ec2 = aws.clients.ec2().await;
    let builder = loop {
        let out = ec2
            .describe_instances()
            .filters(ec2::types::Filter::builder().name("tag:drover:run").values(&run).build())
            .send()
            .await
            .unwrap();
        if let Some(i) = out.reservations().iter().flat_map(|r| r.instances()).next() {
            break i.instance_id().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let attr = ec2
        .describe_instance_attribute()
        .instance_id(&builder)
        .attribute(ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    use base64::Engine as _;
    let user_data =
        base64::engine::general_purpose::STANDARD.decode(attr.user_data().and_then(|u| u.value()).unwrap()).unwrap();
    let user_data = String::from_utf8(user_data).unwrap();
    let key = format!("drover/images/{image_id}/{run}.tar.gz");
    assert!(user_data.contains(&format!("'s3://drover-artifacts/{key}'")), "{user_data}");
    assert!(user_data.contains("echo baked > /etc/motd"), "the build script runs inside: {user_data}");
    for (k, v) in [("drover:artifact-sha256", sha256), ("drover:build", "ok")] {
        ec2.create_tags()
            .resources(&builder)
            .tags(ec2::types::Tag::builder().key(k).value(v).build())
            .send()
            .await
            .unwrap();
    }
    let done = app.wait(&run).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let build = &done["outputs"]["builds"][0];
    assert_eq!(build["artifact"], json!({"bucket": "drover-artifacts", "key": key, "sha256": sha256}), "{done}");
    run
}

/// The service's instance tags on the cluster's machines: unit → (machine, value).
async fn service_tags(
    aws: &Aws,
    cluster_id: &str,
    service_id: &str,
) -> std::collections::BTreeMap<String, (String, String)> {
    let prefix = format!("drover:svc/{service_id}/");
    let mut out = std::collections::BTreeMap::new();
    for i in aws.running_instances(cluster_id).await {
        for t in i.tags() {
            if let Some(unit) = t.key().and_then(|k| k.strip_prefix(&prefix)) {
                out.insert(unit.to_string(), (i.instance_id().unwrap().to_string(), t.value().unwrap().to_string()));
            }
        }
    }
    out
}

/// The commands a run sent, with the script each carried: (comment, instance, script).
async fn scripts_of(aws: &Aws, run: &str) -> Vec<(String, String, String)> {
    let prefix = format!("drover run {run} ");
    let mut all = Vec::new();
    let mut pages = aws.clients.ssm().await.list_commands().into_paginator().send();
    while let Some(page) = pages.next().await {
        all.extend(
            page.unwrap().commands().iter().filter(|c| c.comment().is_some_and(|t| t.starts_with(&prefix))).cloned(),
        );
    }
    all.iter()
        .map(|c| {
            let script = c.parameters().unwrap()["commands"].join("\n");
            let comment = c.comment().unwrap_or_default().to_string();
            // moto lists every instance it has; the comment names the unit,
            // the run's events the machine.
            (comment, c.instance_ids().first().cloned().unwrap_or_default(), script)
        })
        .collect()
}

/// Services on an aws cluster: units over SSM Run Command from the build's
/// S3 artifact, recorded as tags on the machines, placed, scaled, deployed
/// by a plan that a second attempt resumes, stopped and destroyed. moto
/// runs nothing: no unit starts, so the run's own events and the commands
/// sent are what is checked (see `ops/src/aws/service.rs`).
#[tokio::test]
async fn aws_services_are_units_started_over_ssm_from_the_builds_artifact() {
    let mut settings = drover_ops::aws::testing::moto_settings();
    settings.artifact_bucket = Some("drover-artifacts".into());
    let app = drover_tests::spawn_app_with(Backend::Sqlite, settings).await;
    let aws = aws().await;

    let image = unique("web");
    let mut spec = aws.image_spec();
    spec["start_command"] = json!("./serve --port $PORT");
    create(&app, "image", &image, spec).await;
    let first = bake_with_artifact(&app, &aws, &image, &"a".repeat(64)).await;

    let cluster = unique("svc");
    let c = create(&app, "cluster", &cluster, aws.cluster_spec(&image, 2)).await;
    let cluster_id = c["id"].as_str().unwrap().to_string();
    assert_eq!(app.run("cluster", &cluster, json!({"action": "create"})).await["status"], "succeeded");
    let machines: Vec<(String, String)> = aws
        .running_instances(&cluster_id)
        .await
        .iter()
        .map(|i| (i.instance_id().unwrap().to_string(), i.private_ip_address().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(machines.len(), 2);
    for (key, body) in
        [("LOG_LEVEL", json!({"value": "debug"})), ("API_KEY", json!({"value": "s3cr3t-svc", "secret": true}))]
    {
        let r = app.send(&app.client, "PUT", &format!("/v1/settings/cluster:{cluster}/{key}"), Some(body)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    // Bad input, named: no port on aws; a local image.
    let name = unique("app");
    let bad = app
        .post(
            "/v1/services",
            json!({"name": name, "spec": {"provider": "aws", "cluster": cluster, "image": image, "count": 3}}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(bad.body["errors"][0]["field"], "spec.port", "{}", bad.body);
    let local = unique("loc");
    create(&app, "image", &local, json!({"build_command": "true", "start_command": "true"})).await;
    let bad = app
        .post("/v1/services", json!({"name": name, "spec": {"provider": "aws", "cluster": cluster, "image": local, "count": 1, "port": 8080}}))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(bad.body["errors"][0]["field"], "spec.image", "{}", bad.body);

    let svc = create(
        &app,
        "service",
        &name,
        json!({"provider": "aws", "cluster": cluster, "image": image, "count": 3, "port": 8080,
               "health_check": {"type": "http", "path": "/health"}, "env": {"MODE": "blue"}, "start_timeout_secs": 20}),
    )
    .await;
    let service_id = svc["id"].as_str().unwrap().to_string();
    let run = app.run("service", &name, json!({"action": "start"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let run_id = run["id"].as_str().unwrap().to_string();

    // Three instances spread over the two machines (2 + 1), each a tag on
    // its machine naming the build and its port (8080 + index).
    let tags = service_tags(&aws, &cluster_id, &service_id).await;
    assert_eq!(tags.len(), 3, "{tags:?}");
    let mut per_machine = std::collections::BTreeMap::<String, usize>::new();
    for (unit, (machine, value)) in &tags {
        *per_machine.entry(machine.clone()).or_default() += 1;
        let index: u16 = unit.split('-').next().unwrap().parse().unwrap();
        assert!(value.contains(&format!("build={first}")), "{value}");
        assert!(value.contains(&format!("port={}", 8080 + index)), "{value}");
    }
    let mut counts: Vec<usize> = per_machine.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2], "spread over the machines: {tags:?}");
    let out = &run["outputs"];
    assert_eq!(out["count"], 3);
    assert_eq!(out["build"], first);
    for i in out["instances"].as_array().unwrap() {
        let m = machines.iter().find(|(id, _)| i["machine"] == id.as_str()).expect("on a machine of the cluster");
        assert_eq!(i["address"], m.1.as_str(), "{i}");
    }

    // The start scripts: the unit, the artifact and its checksum, the env
    // file with the settings and drover's variables, and no secret.
    let sent = scripts_of(&aws, &run_id).await;
    let starts: Vec<&(String, String, String)> = sent.iter().filter(|(c, _, _)| c.contains(" start ")).collect();
    assert_eq!(starts.len(), 3, "{sent:?}");
    let script = &starts[0].2;
    let key = format!(
        "drover/images/{}/{first}.tar.gz",
        app.get(&format!("/v1/images/{image}")).await.body["id"].as_str().unwrap()
    );
    assert!(script.contains(&format!("'s3://drover-artifacts/{key}'")), "{script}");
    assert!(script.contains(&format!("'{}  /var/lib/drover/services/{name}/", "a".repeat(64))), "{script}");
    assert!(script.contains(&format!("drover-{name}@")) && script.contains("systemctl start"), "{script}");
    assert!(script.contains("LOG_LEVEL=\"debug\"") && script.contains("MODE=\"blue\""), "{script}");
    assert!(script.contains("DROVER_SERVICE=\"") && script.contains("PORT=\"808"), "{script}");
    assert!(script.contains("./serve --port $PORT"), "{script}");
    assert!(script.contains("curl -fsS -o /dev/null --max-time 2 'http://127.0.0.1:808"), "{script}");
    assert!(script.contains("EnvironmentFile=-/etc/drover/secrets.env"), "{script}");
    assert!(!sent.iter().any(|(_, _, s)| s.contains("s3cr3t-svc") || s.contains("API_KEY")), "no secret through SSM");

    // Each healthy instance entered the registry at its machine's private address.
    let changes = app.get(&format!("/v1/discovery-changes?service={name}&after=0")).await.body;
    let entered: Vec<&Value> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change"] == "enter" && c["by"] == run_id.as_str())
        .collect();
    assert_eq!(entered.len(), 3, "{changes}");
    for c in &entered {
        assert!(machines.iter().any(|(id, ip)| c["address"] == ip.as_str() && c["machine"] == id.as_str()), "{c}");
    }

    // A refresh (which resolves no cluster: it finds the machines through
    // the cluster the last run recorded) finds the record and the tags alike.
    let run = app.run("service", &name, json!({"action": "refresh", "reason": "a look"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let view = app.get(&format!("/v1/services/{name}")).await.body;
    assert_eq!(view["drift"]["run"], run["id"], "{view}");
    assert_eq!(view["drift"]["status"], "in_sync", "{view}");

    // Scale to 1: the highest indexes go (stop commands, tags removed).
    let run = app.run("service", &name, json!({"action": "scale", "params": {"count": 1}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let tags = service_tags(&aws, &cluster_id, &service_id).await;
    assert_eq!(tags.len(), 1, "{tags:?}");
    assert!(tags.keys().next().unwrap().starts_with("0-"), "{tags:?}");
    let stops = scripts_of(&aws, run["id"].as_str().unwrap()).await;
    assert_eq!(
        stops.iter().filter(|(c, _, s)| c.contains(" stop ") && s.contains("systemctl stop")).count(),
        2,
        "{stops:?}"
    );

    // A deploy of a second build: a plan, the instance replaced surge-first
    // (the new one beside the old on port 8080 + 64 when on its machine).
    let run = app.run("service", &name, json!({"action": "scale", "params": {"count": 2}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let second = bake_with_artifact(&app, &aws, &image, &"b".repeat(64)).await;
    let run = app.run("service", &name, json!({"action": "deploy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["outputs"]["build"], second);
    assert_eq!(run["outputs"]["previous"]["build"], first);
    let tags = service_tags(&aws, &cluster_id, &service_id).await;
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(tags.values().all(|(_, v)| v.contains(&format!("build={second}"))), "{tags:?}");
    // Each new instance started beside its predecessor (on its machine):
    // port + 64 + index, so the two never share a port.
    let mut ports: Vec<&str> =
        tags.values().map(|(_, v)| v.split(' ').find(|f| f.starts_with("port=")).unwrap()).collect();
    ports.sort();
    assert_eq!(ports, vec!["port=8144", "port=8145"], "{tags:?}");
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    let plan = events["events"].as_array().unwrap().iter().find(|e| e["step"] == "plan").expect("a plan event");
    assert_eq!(plan["data"]["indexes"], json!([0, 1]), "{plan}");
    assert_eq!(plan["data"]["max_surge"], 1, "{plan}");

    // The same deploy tried again after drover died mid-plan: the second
    // attempt reads the plan back and carries out the same one.
    let services = drover_ops::aws::AwsServices::new(
        aws.clients.clone(),
        Arc::new(drover_ops::aws::SdkStacks::new(aws.clients.clone())),
        moto_settings().poll,
    );
    let svc_r = app.get(&format!("/v1/services/{name}")).await.body;
    let cluster_r = app.get(&format!("/v1/clusters/{cluster}")).await.body;
    let image_r = app.get(&format!("/v1/images/{image}")).await.body;
    let as_resource = |kind, v: &Value| {
        let mut r = drover_ops::aws::testing::resource(
            kind,
            v["name"].as_str().unwrap(),
            v["spec"].clone(),
            v["state"].as_str().unwrap(),
            v["outputs"].clone(),
        );
        r.id = v["id"].as_str().unwrap().parse().unwrap();
        r
    };
    let mut job = drover_ops::aws::testing::job(
        drover_domain::kinds::service::KIND,
        &name,
        svc_r["spec"].clone(),
        "deploy",
        json!({"build": first}),
        vec![
            as_resource(drover_domain::kinds::cluster::KIND, &cluster_r),
            as_resource(drover_domain::kinds::image::KIND, &image_r),
        ],
    );
    job.resource = as_resource(drover_domain::kinds::service::KIND, &svc_r);
    // The first attempt makes its plan and is stopped before its first
    // batch (as drover dying would); the second resumes that plan.
    let ctx = drover_ops::aws::testing::RecordingCtx::new(job.run_id);
    ctx.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(services.apply(&ctx, &job).await, Err(ProviderError::Cancelled)));
    assert_eq!(service_tags(&aws, &cluster_id, &service_id).await.len(), 2, "nothing changed yet");
    ctx.cancel.store(false, std::sync::atomic::Ordering::Relaxed);
    let again = services.apply(&ctx, &job).await.expect("second attempt");
    assert_eq!(again["build"], first);
    let said = ctx.messages();
    assert!(said.iter().any(|m| m.starts_with("resume: resuming the plan of this run: 2")), "{said:?}");
    assert_eq!(said.iter().filter(|m| m.starts_with("plan: plan: replace")).count(), 1, "one plan: {said:?}");
    assert!(said.iter().any(|m| m.starts_with("plan: plan carried out")), "{said:?}");
    let tags = service_tags(&aws, &cluster_id, &service_id).await;
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(tags.values().all(|(_, v)| v.contains(&format!("build={first}"))), "{tags:?}");

    // A repair sends each instance its (idempotent) start script again:
    // a unit that died starts again, one that runs has its health checked.
    let run = app.run("service", &name, json!({"action": "repair", "reason": "a unit died"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let sent = scripts_of(&aws, run["id"].as_str().unwrap()).await;
    assert_eq!(
        sent.iter().filter(|(c, _, s)| c.contains(" start ") && s.contains("systemctl is-active")).count(),
        2,
        "{sent:?}"
    );
    assert_eq!(service_tags(&aws, &cluster_id, &service_id).await.len(), 2, "the same instances");

    // Stop, then destroy: no tag left.
    assert_eq!(app.run("service", &name, json!({"action": "stop"})).await["status"], "succeeded");
    assert!(service_tags(&aws, &cluster_id, &service_id).await.is_empty());
    assert_eq!(app.run("service", &name, json!({"action": "destroy"})).await["status"], "succeeded");
    assert_eq!(app.run("cluster", &cluster, json!({"action": "destroy"})).await["status"], "succeeded");
}

/// A cluster with a `port`: its auto-scaling group has no load balancer to
/// check its instances, so drover asks each instance's private address
/// itself. moto's instances in a `127.0.0.0/16` VPC have loopback
/// addresses, where this test serves the health endpoint: a create waits
/// for every instance's answer (and fails naming each that does not), the
/// view shows each instance's answer and, once they stop answering, names
/// them as what a repair fixes; with `auto_repair` the observer asks for
/// that repair, which marks them Unhealthy in the group (which real AWS
/// replaces; moto launches nothing, so the repair waiting for the
/// replacements is cancelled here).
#[tokio::test]
async fn aws_cluster_instances_answer_its_health_check() {
    let app = spawn_app_on_moto(Backend::Sqlite).await;
    let aws = aws().await;
    let (image, _) = built_image(&app, &aws).await;
    let ec2 = aws.clients.ec2().await;
    let vpc = ec2.create_vpc().cidr_block("127.0.0.0/16").send().await.unwrap();
    let vpc = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_string();
    let subnet = ec2.create_subnet().vpc_id(&vpc).cidr_block("127.0.1.0/24").send().await.unwrap();
    let subnet = subnet.subnet().and_then(|s| s.subnet_id()).unwrap().to_string();
    let (port, endpoint) = drover_ops::aws::testing::health_endpoint("0.0.0.0").await;
    let spec = |path: &str| {
        json!({"provider": "aws", "image": image, "count": 2, "instance_type": "t2.micro", "subnets": [subnet],
               "port": port, "health_check": {"type": "http", "path": path}, "start_timeout_secs": 1})
    };

    // auto_repair on aws needs a check drover can ask.
    let mut unchecked = spec("/health");
    unchecked.as_object_mut().unwrap().remove("port");
    unchecked["auto_repair"] = true.into();
    let r = app.post("/v1/clusters", json!({"name": unique("hc"), "spec": unchecked})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.to_string().contains("spec.auto_repair"), "{}", r.body);

    // A check the instances fail: the create fails, naming each and why.
    let failing = unique("hc");
    create(&app, "cluster", &failing, spec("/missing")).await;
    let run = app.run("cluster", &failing, json!({"action": "create"})).await;
    assert_eq!(
        (run["status"].as_str(), run["error"]["code"].as_str()),
        (Some("failed"), Some("instances_not_healthy"))
    );
    let message = run["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "0 of 2 instance(s) of cluster {failing} answer its health check (GET /missing on port {port})"
        )),
        "{message}"
    );
    assert_eq!(message.matches(": GET /missing answered 404").count(), 2, "{message}");
    assert!(message.contains(" at 127.0.1."), "{message}");
    let run = app.run("cluster", &failing, json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // A check they pass: up, each instance answering at its private address.
    let name = unique("hc");
    let mut healing = spec("/health");
    healing["auto_repair"] = true.into();
    let id = create(&app, "cluster", &name, healing).await["id"].as_str().unwrap().to_string();
    let run = app.run("cluster", &name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    let said = format!("2 of 2 instance(s) answer their health check (GET /health on port {port})");
    assert!(events["events"].as_array().unwrap().iter().any(|e| e["message"] == said.as_str()), "{events}");
    let seen = app.get_until(&format!("/v1/clusters/{name}"), |v| v["observed"]["healthy"] == true).await;
    let instances = seen["observed"]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{seen}");
    for i in instances {
        let ip = i["private_ip"].as_str().unwrap();
        assert_eq!((i["address"].clone(), i["healthy"].clone()), (json!(format!("{ip}:{port}")), json!(true)));
    }

    // The endpoint stops: the view names both instances as what a repair fixes.
    endpoint.abort();
    let seen = app.get_until(&format!("/v1/clusters/{name}"), |v| v["observed"]["needs_repair"].is_string()).await;
    assert_eq!(seen["observed"]["healthy"], false, "{seen}");
    let why = seen["observed"]["needs_repair"].as_str().unwrap();
    assert!(why.starts_with("failing the health check: i-") && why.matches("connect").count() == 2, "{why}");

    // With auto_repair, the observer asks for the repair itself, which
    // marks them Unhealthy in the group, for it to replace them.
    let repair = app
        .get_until(&format!("/v1/transitions?kind=cluster&action=repair&resource={id}"), |v| {
            v["items"].as_array().is_some_and(|i| !i.is_empty())
        })
        .await["items"][0]
        .clone();
    assert_eq!(repair["actor"], "observer", "{repair}");
    assert!(repair["reason"].as_str().unwrap().starts_with("auto-repair (attempt 1 of "), "{repair}");
    let run = repair["id"].as_str().unwrap().to_string();
    let group = app.get(&format!("/v1/clusters/{name}")).await.body["outputs"]["stack_outputs"]["AutoScalingGroupName"]
        .as_str()
        .expect("the group")
        .to_string();
    let asg = aws.clients.autoscaling().await;
    let mut marked = 0;
    for _ in 0..100 {
        let g = asg.describe_auto_scaling_groups().auto_scaling_group_names(&group).send().await.unwrap();
        let g = g.auto_scaling_groups().first().cloned().expect("the group");
        marked = g.instances().iter().filter(|i| i.health_status() == Some("Unhealthy")).count();
        if marked == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(marked, 2, "both instances marked Unhealthy");
    let r = app.post(&format!("/v1/transitions/{run}/cancel"), json!({"reason": "moto replaces nothing"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let ended = app.wait(&run).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let events = app.get(&format!("/v1/transitions/{run}/events")).await.body;
    let marks = events["events"].as_array().unwrap().iter().filter(|e| {
        e["level"] == "warn"
            && e["message"].as_str().unwrap().ends_with("marked Unhealthy, for its auto-scaling group to replace")
    });
    assert_eq!(marks.count(), 2, "{events}");
    let r = app.patch(&format!("/v1/clusters/{name}"), json!({"spec": {"auto_repair": false}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    let run = app.run("cluster", &name, json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(aws.running_instances(&id).await.is_empty());
}
