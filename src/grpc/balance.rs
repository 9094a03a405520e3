//! BalanceService: decode, validate, call the use case, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    app::{Balances, ChargeCommand},
    domain::{IdempotencyKey, PageSize, PageToken, UserId, Won},
    proto::{
        ChargeBalanceRequest, ChargeBalanceResponse, GetBalanceRequest, GetBalanceResponse,
        ListBalanceHistoryRequest, ListBalanceHistoryResponse,
        balance_service_server::BalanceService,
    },
};

pub struct BalanceHandler(pub Arc<Balances>);

#[tonic::async_trait]
impl BalanceService for BalanceHandler {
    async fn charge_balance(
        &self,
        request: Request<ChargeBalanceRequest>,
    ) -> Result<Response<ChargeBalanceResponse>, Status> {
        let req = request.into_inner();
        let cmd = ChargeCommand {
            user_id: UserId::parse(req.user_id, "user_id")?,
            amount: Won::parse_positive(req.amount, "amount")?,
            idempotency_key: IdempotencyKey::parse(req.idempotency_key)?,
        };
        let entry = self.0.charge(cmd).await?;
        Ok(Response::new(ChargeBalanceResponse {
            user_id: entry.user_id.get(),
            balance: entry.balance_after.get(),
            history_id: entry.id,
        }))
    }

    async fn get_balance(
        &self,
        request: Request<GetBalanceRequest>,
    ) -> Result<Response<GetBalanceResponse>, Status> {
        let user_id = UserId::parse(request.into_inner().user_id, "user_id")?;
        let balance = self.0.balance(user_id).await?;
        Ok(Response::new(GetBalanceResponse {
            user_id: user_id.get(),
            balance: balance.get(),
        }))
    }

    async fn list_balance_history(
        &self,
        request: Request<ListBalanceHistoryRequest>,
    ) -> Result<Response<ListBalanceHistoryResponse>, Status> {
        let req = request.into_inner();
        let user_id = UserId::parse(req.user_id, "user_id")?;
        let page_size = PageSize::parse(req.page_size)?;
        let after = PageToken::parse(&req.page_token)?;
        let (entries, next) = self.0.history(user_id, page_size, after).await?;
        Ok(Response::new(ListBalanceHistoryResponse {
            entries: entries.into_iter().map(convert::ledger_entry).collect(),
            next_page_token: next.map(PageToken::encode).unwrap_or_default(),
        }))
    }
}
