"""Bearer-token auth: reading needs any valid token, writing needs role reviewer or admin."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from harmonia.store import users as user_store
from harmonia.store.users import User

bearer = HTTPBearer(auto_error=False, description="An API token from `harmonia user add NAME`.")


async def current_user(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> User:
    # Async, on the service's async pool: checked on the event loop, so a request makes one trip to a worker
    # thread (its endpoint), not two. The token is looked up on every request: a revoked one stops at once.
    if creds is None or not creds.credentials:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})
    async with request.app.state.service.aconnection() as conn:
        user = await user_store.user_by_token_async(conn, creds.credentials)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown or disabled API token",
                            headers={"WWW-Authenticate": "Bearer"})
    return user


async def writer(user: User = Depends(current_user)) -> User:
    if user["role"] not in user_store.WRITE_ROLES:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"user {user['name']!r} has role {user['role']!r}; writing needs reviewer or admin")
    return user
