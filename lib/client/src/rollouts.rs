//! Rollouts: ask for one, read them, and pause, resume, promote or undo one (docs/services.md).

use crate::{segment, Client, Result};
use fleet_api::{Rollout, RolloutList, RolloutRequest};
use reqwest::StatusCode;

impl Client {
    /// `POST /rollouts` (admin role): the rollout as it starts.
    pub async fn create_rollout(&self, req: &RolloutRequest) -> Result<Rollout> {
        let what = format!("roll out {}", req.service);
        let resp = self.send(&what, |http, base| http.post(format!("{base}/rollouts")).json(req)).await?;
        Self::answer(&what, resp).await
    }

    /// A service's last rollout, or `None` if it has had none.
    pub async fn rollout(&self, service: &str) -> Result<Option<Rollout>> {
        let what = format!("GET rollout {service}");
        let path = format!("rollouts/{}", segment(service));
        let resp = self.send(&what, |http, base| http.get(format!("{base}/{path}"))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::answer(&what, resp).await.map(Some)
    }

    /// Every service's last rollout.
    pub async fn rollouts(&self) -> Result<Vec<Rollout>> {
        let what = "GET rollouts";
        let resp = self.send(what, |http, base| http.get(format!("{base}/rollouts"))).await?;
        Self::answer::<RolloutList>(what, resp).await.map(|l| l.rollouts)
    }

    /// `POST /rollouts/SERVICE/ACTION`: `pause`, `resume`, `promote` or `undo`.
    pub async fn rollout_action(&self, service: &str, action: &str) -> Result<Rollout> {
        let what = format!("{action} the rollout of {service}");
        let path = format!("rollouts/{}/{}", segment(service), segment(action));
        let resp = self.send(&what, |http, base| http.post(format!("{base}/{path}"))).await?;
        Self::answer(&what, resp).await
    }
}
