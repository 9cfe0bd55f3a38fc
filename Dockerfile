# One image for every role: the default command serves the web app, and
# docker-compose.yml runs the migration and the Huey consumers from the same
# image with other commands.
FROM python:3.11-slim

# HOST: the app's default, 127.0.0.1, cannot be reached from outside the
# container. INSTANCE_PATH: the SQLite ledger, the embedded Huey database and
# the generated secret key go to the volume, not into the container's layer.
# The code is read-only to the app user, so Python could not write bytecode
# caches beside it anyway; unbuffered output reaches `docker logs` at once.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    INSTANCE_PATH=/data \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app

# Requirements before the code, so a code change does not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .

# A fixed uid, so a bind-mounted /data can be given to it on the host
# (chown 10001). /data is prepared before VOLUME: Docker discards later
# changes to a volume path, and a new named volume takes this owner.
RUN useradd --system --user-group --uid 10001 --no-create-home app \
    && mkdir /data \
    && chown app:app /data
VOLUME /data
USER app

EXPOSE 8000
# SIGTERM (docker stop) is a graceful stop for both commands: gunicorn
# closes live pages' sockets with 1012 and finishes requests within 30 s;
# huey_consumer lets running jobs finish for GRACE_PERIOD (25 s), then puts
# the rest back in the queue. Docker's grace period must be longer than
# that (docker-compose.yml gives 35 s), or SIGKILL cuts the job off and the
# reaper has to recover it as lost.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
